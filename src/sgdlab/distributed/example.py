"""A complete data-parallel training script: ``python -m sgdlab.distributed.example``.

Least-squares regression with a small MLP on synthetic data, trained with batch-size-invariant
RMSProp (per-example second moments, linear rule from ``--ref-batch``) and the global noise
meter. Each step draws a fresh global batch from a generator seeded by the step number and gives
rank r its slice, so the trajectory depends only on the global batch, not on the world size::

    torchrun --standalone --nproc-per-node=2 -m sgdlab.distributed.example --steps 100
    python -m sgdlab.distributed.example --steps 100        # the same run on one process

Rank 0 prints the global batch, the loss and ``B_simple`` and, with ``--out FILE``, writes them
as JSON; ``--checkpoint FILE`` saves every ``--save-every`` steps and resumes from ``FILE`` when
it exists.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from sgdlab.optim import RMSProp

from .launch import init_from_env, launched_by_torchrun
from .parallel import DataParallel

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sgdlab.distributed.example")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64, help="global batch B (split over ranks)")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    p.add_argument("--ref-batch", type=int, default=32, help="batch size the lr is tuned at")
    p.add_argument("--lr", type=float, default=1e-3, help="RMSProp lr at --ref-batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--float64", action="store_true", help="train in double precision")
    p.add_argument("--out", default=None, help="JSON file for rank 0's log")
    return p


def _data(step: int, batch: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(batch, 8, generator=g, dtype=dtype)
    w = torch.linspace(-1.0, 1.0, 8, dtype=dtype)
    y = (torch.sin(x @ w) + 0.1 * torch.randn(batch, generator=g, dtype=dtype)).unsqueeze(1)
    return x, y


@record
def main(argv: Sequence[str] | None = None) -> int:
    """Train; returns the exit code. (``@record`` hands a rank's traceback to torchrun, which
    prints it when it stops the job.)"""
    args = _parser().parse_args(argv)
    for name in ("steps", "batch", "accumulation", "ref_batch", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = init_from_env() if launched_by_torchrun() else torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if args.batch < world * args.accumulation:
        raise ValueError(
            f"--batch must be >= world size x --accumulation = {world * args.accumulation}, "
            f"got {args.batch}"
        )
    dtype = torch.float64 if args.float64 else torch.float32
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)).to(device, dtype)
    opt = RMSProp(
        model.parameters(),
        lr=args.lr,
        second_moment="per_example",
        ref_batch_size=args.ref_batch,
        scaling="linear",
    )
    dp = DataParallel(model, opt, accumulation_steps=args.accumulation, noise_meter=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and ckpt.is_file():
        dp.load(ckpt)
    share = [len(t) for t in torch.arange(args.batch).tensor_split(world)]
    start = sum(share[:rank])
    log = []
    while dp.steps < args.steps:
        x, y = _data(dp.steps, args.batch, args.seed, dtype)
        x = x[start : start + share[rank]].to(device)
        y = y[start : start + share[rank]].to(device)
        loss, reading = dp.train_step(x, y, nn.functional.mse_loss)
        assert reading is not None
        log.append(
            {
                "step": dp.steps,
                "batch": dp.num_examples,
                "loss_rank": loss,
                "b_simple": reading.b_simple_smoothed,
            }
        )
        if rank == 0 and (dp.steps % 10 == 0 or dp.steps == args.steps):
            print(
                f"step {dp.steps:5d}  global batch {dp.num_examples}  loss (rank 0) "
                f"{loss:.5f}  B_simple {reading.b_simple_smoothed:.1f}",
                flush=True,
            )
        if ckpt is not None and dp.steps % args.save_every == 0:
            dp.save(ckpt)
    if rank == 0 and args.out:
        params = [p.detach().cpu().double().flatten() for p in model.parameters()]
        summary = {
            "world_size": world,
            "steps": dp.steps,
            "log": log,
            "param_norm": math.sqrt(float(torch.cat(params).pow(2).sum())),
        }
        Path(args.out).write_text(json.dumps(summary))
    dp.close()
    if dist.is_initialized():
        dist.barrier()  # no rank tears its process group down while a peer still uses it
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
