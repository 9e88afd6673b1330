"""Cost of global per-example second moments in data-parallel training (2 CPU processes, gloo).

Per configuration (MLP widths, per-rank batch) and per variant, the time of one training step
on 2 ranks: the best (and the median) over interleaved rounds, each the mean of ``--steps``
steps after warm-up. The best round is the estimate least disturbed by other load on the
machine; variants are interleaved so drifts in load hit them alike.

* ``ddp``: plain torch DDP + torch.optim.Adam: the anchor.
* ``ddp+tracker``: torch DDP + sgdlab.stats.track + sgdlab.Adam(second_moment="per_example")
  reading the *local* second moments: everything but the second-moment all-reduce.
* ``DataParallel``: sgdlab.distributed.DataParallel with the same optimizer: global batch
  gather, loss scaling, and the flattened second-moment all-reduce (global statistics).
* ``DataParallel (all-reduce after backward)``: the same with ``overlap=False``: the
  second-moment all-reduce starts after ``loss.backward()`` returns instead of inside it.
* ``DataParallel (no moments)``: DataParallel with torch.optim.Adam (no tracker): the cost of
  the wrapper's bookkeeping alone.

Bytes per step are the all-reduce payloads (gradients for DDP; second moments and the batch
gather added by DataParallel); a ring all-reduce moves 2 (W-1)/W times its payload per rank.

    .venv/bin/python benchmarks/distributed_step.py            # writes the table to stdout
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import sgdlab
import sgdlab.stats
from sgdlab.distributed import DataParallel, spawn

VARIANTS = (
    "ddp",
    "ddp+tracker",
    "DataParallel",
    "DataParallel (all-reduce after backward)",
    "DataParallel (no moments)",
)
CONFIGS = [
    dict(widths=(256, 512, 512, 10), batch=64),
    dict(widths=(256, 512, 512, 10), batch=256),
    dict(widths=(784, 1024, 1024, 10), batch=128),
]


def _model(widths: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class _Runner:
    def __init__(self, variant: str, widths: tuple[int, ...]) -> None:
        self.variant = variant
        model = _model(widths)
        self.model = model
        if variant == "ddp":
            self.ddp = nn.parallel.DistributedDataParallel(model)
            self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        elif variant == "ddp+tracker":
            self.tracker = sgdlab.stats.track(model)
            self.ddp = nn.parallel.DistributedDataParallel(model)
            self.opt = sgdlab.Adam(model.parameters(), lr=1e-4, second_moment="per_example")
        elif variant.startswith("DataParallel (all"):
            self.opt = sgdlab.Adam(model.parameters(), lr=1e-4, second_moment="per_example")
            self.dp = DataParallel(model, self.opt, overlap=False)
        elif variant == "DataParallel":
            self.opt = sgdlab.Adam(model.parameters(), lr=1e-4, second_moment="per_example")
            self.dp = DataParallel(model, self.opt)
        else:
            self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            self.dp = DataParallel(model, self.opt)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.variant.startswith("DataParallel"):
            self.dp.train_step(x, y, nn.functional.cross_entropy)
            return
        self.opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(self.ddp(x), y).backward()
        self.opt.step()


def _job(rank: int, world: int, cfg: dict, rounds: int, steps: int, out: str) -> None:
    widths, batch = tuple(cfg["widths"]), int(cfg["batch"])
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, widths[0], generator=g)
    y = torch.randint(0, widths[-1], (batch,), generator=g)
    runners = {v: _Runner(v, widths) for v in VARIANTS}
    for r in runners.values():
        for _ in range(3):
            r.step(x, y)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v, r in runners.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                r.step(x, y)
            dist.barrier()
            times[v].append((time.perf_counter() - t0) / steps)
    if rank == 0:
        n_params = sum(p.numel() for p in runners["ddp"].model.parameters())
        overlapped = runners["DataParallel"].dp.overlapped_launches
        total = runners["DataParallel"].dp.steps
        Path(out).write_text(
            json.dumps(
                {
                    "times": times,
                    "params": n_params,
                    "overlapped": overlapped,
                    "dp_steps": total,
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    world = 2
    print(
        f"torch {torch.__version__}, {world} CPU processes (gloo), 1 thread each, float32, "
        f"best (median) of {args.rounds} interleaved rounds x {args.steps} steps\n"
    )
    print(
        "| model (widths) | per-rank batch | params | variant | ms/step best (median) | "
        "vs ddp best (median) | all-reduce payload/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for cfg in CONFIGS:
        with tempfile.TemporaryDirectory() as d:
            out = str(Path(d) / "r.json")
            spawn(_job, world, (cfg, args.rounds, args.steps, out), threads=1, deadline=1800)
            res = json.loads(Path(out).read_text())
        best = {v: min(t) for v, t in res["times"].items()}
        med = {v: statistics.median(t) for v, t in res["times"].items()}
        grad_bytes = res["params"] * 4
        payload = {v: 2 * grad_bytes + 16 * world for v in VARIANTS}
        payload.update(
            {
                "ddp": grad_bytes,
                "ddp+tracker": grad_bytes,
                "DataParallel (no moments)": grad_bytes + 16 * world,
            }
        )
        for v in VARIANTS:
            print(
                f"| {'-'.join(map(str, cfg['widths']))} | {cfg['batch']} | {res['params']:,} "
                f"| {v} | {1e3 * best[v]:.1f} ({1e3 * med[v]:.1f}) | "
                f"{best[v] / best['ddp']:.2f}x ({med[v] / med['ddp']:.2f}x) | "
                f"{payload[v] / 1e6:.2f} MB |"
            )
        a, b = "DataParallel", "ddp+tracker"
        print(
            f"|  |  |  | second-moment all-reduce alone: {a} / {b} | | "
            f"{best[a] / best[b]:.2f}x ({med[a] / med[b]:.2f}x) | "
            f"overlapped launches {res['overlapped']}/{res['dp_steps']} |"
        )


if __name__ == "__main__":
    main()
