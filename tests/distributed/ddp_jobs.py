"""Problems, single-process references and the jobs the distributed tests spawn.

Everything here runs in float64. A *case* fixes a model, an optimizer, the local batch size of
every rank, the accumulation steps and the number of steps; the global batch of step t is drawn
from a generator seeded by t, and rank r trains on its slice of it, so the single-process
reference on the concatenated batch sees exactly the same examples.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sgdlab
import sgdlab.stats
from sgdlab.distributed import DataParallel

CASES: dict[str, dict[str, Any]] = {
    # momentum SGD with weight decay; lr tuned at B0 = 4, moved to B = 8 by the lecture rule
    "sgd-unequal": dict(
        opt="sgd",
        kw=dict(lr=0.05, momentum=0.9, weight_decay=0.01, ref_batch_size=4, scaling="lecture"),
        sizes=(5, 3),
        k=1,
        no_sync=True,
        steps=3,
        meter=False,
    ),
    # batch-size-invariant RMSProp reading global per-example second moments
    "rmsprop-per-example": dict(
        opt="rmsprop",
        kw=dict(
            lr=0.01,
            momentum=0.5,
            second_moment="per_example",
            weight_decay=0.02,
            ref_batch_size=6,
            scaling="linear",
        ),
        sizes=(7, 5),
        k=1,
        no_sync=True,
        steps=3,
        meter=True,
    ),
    # 4 micro-batches with DDP's no_sync: equals one batch of 16
    "adam-accumulate-no-sync": dict(
        opt="adam",
        kw=dict(lr=0.01, second_moment="per_example", ref_batch_size=16),
        sizes=(8, 8),
        k=4,
        no_sync=True,
        steps=3,
        meter=True,
    ),
    # 4 micro-batches of unequal sizes, gradients all-reduced in every micro-batch
    "adam-accumulate-sync-unequal": dict(
        opt="adam",
        kw=dict(
            lr=0.01,
            second_moment="per_example",
            power=1.0,
            eps_placement="inside",
            ref_batch_size=8,
            scaling="sqrt",
        ),
        sizes=(9, 6),
        k=4,
        no_sync=False,
        steps=3,
        meter=True,
    ),
    # the trajectory a killed run resumes (uninterrupted here)
    "resume": dict(
        opt="adam",
        kw=dict(lr=0.02, second_moment="per_example", ref_batch_size=8, scaling="linear"),
        sizes=(4, 4),
        k=2,
        no_sync=True,
        steps=8,
        meter=False,
    ),
    # ranks stay bit-identical for 50 steps
    "identical-50": dict(
        opt="rmsprop",
        kw=dict(lr=0.01, second_moment="per_example", centered=True, ref_batch_size=8),
        sizes=(6, 4),
        k=2,
        no_sync=True,
        steps=50,
        meter=True,
    ),
}

SAVE_AT = (3, 6)
KILL_AT = 6  # rank 0 is killed in the middle of the step that would make 7


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def build_optimizer(case: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    cls = {"sgd": sgdlab.SGD, "rmsprop": sgdlab.RMSProp, "adam": sgdlab.Adam}[case["opt"]]
    return cls(model.parameters(), **case["kw"])


def global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_007 * step + 17)
    x = torch.randn(size, 5, generator=g, dtype=torch.float64)
    y = torch.randn(size, 3, generator=g, dtype=torch.float64)
    return x, y


def local_batch(step: int, sizes: tuple[int, ...], rank: int) -> tuple[torch.Tensor, ...]:
    x, y = global_batch(step, sum(sizes))
    a = sum(sizes[:rank])
    return x[a : a + sizes[rank]], y[a : a + sizes[rank]]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Parameters, per-example second moments and optimizer state (cloned)."""
    params = [p.detach().clone() for p in model.parameters()]
    moments = [
        None
        if getattr(p, "grad_second_moment", None) is None
        else p.grad_second_moment.detach().clone()
        for p in model.parameters()
    ]
    state = []
    for p in model.parameters():
        st = opt.state.get(p, {})
        state.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in st.items()})
    return {"params": params, "moments": moments, "state": state}


def reading_numbers(r: Any) -> list[float]:
    return [r.tr_sigma, r.grad_sq_norm, r.b_simple, r.b_simple_smoothed]


def reference(name: str, steps: int | None = None) -> dict[str, Any]:
    """The single-process run on the concatenated global batch (no accumulation)."""
    case = CASES[name]
    model = build_model(0)
    opt = build_optimizer(case, model)
    needs = case["meter"] or case["kw"].get("second_moment") == "per_example"
    tracker = sgdlab.stats.track(model) if needs else None
    B = sum(case["sizes"])
    meter = sgdlab.stats.NoiseMeter(opt, batch_size=B) if case["meter"] else None
    readings = []
    for t in range(case["steps"] if steps is None else steps):
        opt.zero_grad(set_to_none=True)
        x, y = global_batch(t, B)
        loss_fn(model(x), y).backward()
        if meter is not None:
            readings.append(reading_numbers(meter.update()))
        opt.step(batch_size=B)
    out = snapshot(model, opt)
    out["readings"] = readings
    out["batch_sizes"] = [opt.param_groups[0]["batch_size"]]
    if tracker is not None:
        tracker.detach(clear=False)
    return out


def run_case(name: str, rank: int, world: int, *, seed: int | None = None) -> dict[str, Any]:
    """Train a case with DataParallel on this rank; returns its snapshot and readings."""
    case = CASES[name]
    model = build_model(rank if seed is None else seed)  # rank 1 starts elsewhere: DDP
    opt = build_optimizer(case, model)  # broadcasts rank 0's parameters
    sizes = case["sizes"] if world > 1 else (sum(case["sizes"]),)
    dp = DataParallel(
        model,
        opt,
        accumulation_steps=case["k"],
        no_sync=case["no_sync"],
        noise_meter=case["meter"],
    )
    readings, batch_sizes, trajectory = [], [], []
    for t in range(case["steps"]):
        x, y = local_batch(t, sizes, rank)
        _, reading = dp.train_step(x, y, loss_fn)
        batch_sizes.append(dp.num_examples)
        flat = [p.detach().reshape(-1) for p in model.parameters()]
        flat += [
            v.reshape(-1) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
        ]
        trajectory.append(torch.cat(flat).clone())
        if reading is not None:
            readings.append(reading_numbers(reading))
    out = snapshot(model, opt)
    out["readings"] = readings
    out["batch_sizes"] = batch_sizes
    out["trajectory"] = trajectory
    out["opt_batch_size"] = opt.param_groups[0]["batch_size"]
    out["overlapped"] = dp.overlapped_launches
    dp.close()
    return out


def errors_on_disagreement(rank: int, world: int) -> dict[str, str]:
    """Ranks that disagree on accumulation steps (or on local sizes with equal_local) get a
    ValueError on every rank, before any gradient is exchanged."""
    got: dict[str, str] = {}
    case = CASES["resume"]
    model = build_model(0)
    dp = DataParallel(model, build_optimizer(case, model), accumulation_steps=2 if rank else 1)
    try:
        dp.begin_step(4)
    except ValueError as e:
        got["accumulation"] = str(e)
    dp.close()
    dp = DataParallel(model, build_optimizer(case, model), equal_local=True)
    try:
        dp.begin_step(4 + rank)
    except ValueError as e:
        got["equal_local"] = str(e)
    dp.close()
    return got


# ---------------------------------------------------------------------------- jobs
def job_equivalence(rank: int, world: int, out: str) -> None:
    results: dict[str, Any] = {name: run_case(name, rank, world) for name in CASES}
    results["errors"] = errors_on_disagreement(rank, world)
    torch.save(results, Path(out) / f"rank{rank}.pt")


def _train_with_checkpoints(rank: int, world: int, ckpt: str, kill: bool, out: str) -> None:
    case = CASES["resume"]
    sizes = case["sizes"] if world > 1 else (sum(case["sizes"]),)
    # The killed run starts as the uninterrupted one; the resumed run from elsewhere, so the
    # checkpoint must supply everything.
    model = build_model(rank if kill else 100 + rank)
    opt = build_optimizer(case, model)
    dp = DataParallel(model, opt, accumulation_steps=case["k"])
    if Path(ckpt).is_file():
        dp.load(ckpt)
    while dp.steps < case["steps"]:
        x, y = local_batch(dp.steps, sizes, rank)
        if kill and dp.steps == KILL_AT and rank == 0:
            dp.begin_step(len(x))
            with dp.accumulate(len(x) // 2):
                dp.backward(loss_fn(dp(x[: len(x) // 2]), y[: len(x) // 2]))
            os.kill(os.getpid(), signal.SIGKILL)
        dp.train_step(x, y, loss_fn)
        if dp.steps in SAVE_AT:
            dp.save(ckpt)
    torch.save(snapshot(model, opt), Path(out) / f"resumed{rank}.pt")


def job_killed(rank: int, world: int, ckpt: str, out: str) -> None:
    _train_with_checkpoints(rank, world, ckpt, True, out)


def job_resume(rank: int, world: int, ckpt: str, out: str) -> None:
    _train_with_checkpoints(rank, world, ckpt, False, out)


def job_bad_input(rank: int, world: int) -> None:
    """Rank 1 feeds inputs with the wrong number of features."""
    case = CASES["resume"]
    model = build_model(0)
    dp = DataParallel(model, build_optimizer(case, model))
    x, y = local_batch(0, case["sizes"], rank)
    if rank == 1:
        x = x[:, :4]
    dp.train_step(x, y, loss_fn)


def job_stalled(rank: int, world: int) -> None:
    """Rank 1 never reaches the step's first collective; rank 0's must time out."""
    case = CASES["resume"]
    model = build_model(0)
    dp = DataParallel(model, build_optimizer(case, model))
    if rank == 1:
        time.sleep(120)
    x, y = local_batch(0, case["sizes"], rank)
    dp.train_step(x, y, loss_fn)


# A rank that declares begin_step(8) but feeds other micro-batches; the others feed 8.
MISCOUNTS: dict[str, dict[str, Any]] = {
    "short": dict(k=1, no_sync=True, bad=(4,)),  # the one exchange is the last
    "short-no-sync": dict(k=2, no_sync=True, bad=(4, 2)),  # found at the last micro-batch
    "over-sync": dict(k=2, no_sync=False, bad=(8, 1)),  # found before the first exchange
    "short-sync": dict(k=2, no_sync=False, bad=(2, 2)),  # found at the last (first exchanged)
}
DECLARED = 8


def one_correct_step(world: int, k: int) -> list[torch.Tensor]:
    """The single-process reference: one step on the concatenated batch of ``DECLARED``
    examples per rank, from ``build_model(0)`` (case "resume"'s Adam)."""
    model = build_model(0)
    opt = build_optimizer(CASES["resume"], model)
    tracker = sgdlab.stats.track(model)
    B = DECLARED * world
    x, y = global_batch(0, B)
    loss_fn(model(x), y).backward()
    opt.step(batch_size=B)
    tracker.detach()
    return [p.detach().clone() for p in model.parameters()]


def job_miscount(rank: int, world: int, out: str) -> None:
    """Each MISCOUNTS case on a fresh model: the miscounted step (its error, and whether the
    parameters and the optimizer stayed untouched), then a correct step of the same
    DataParallel (its parameters)."""
    results: dict[str, Any] = {}
    sizes = (DECLARED,) * world
    for name, m in MISCOUNTS.items():
        model = build_model(0)
        opt = build_optimizer(CASES["resume"], model)
        dp = DataParallel(model, opt, accumulation_steps=m["k"], no_sync=m["no_sync"])
        before = [p.detach().clone() for p in model.parameters()]
        x, y = local_batch(0, sizes, rank)
        micro = m["bad"] if rank == world - 1 else (DECLARED // m["k"],) * m["k"]
        error = None
        try:
            dp.begin_step(DECLARED)
            a = 0
            for n in micro:
                with dp.accumulate(n):
                    dp.backward(loss_fn(dp(x[a : a + n]), y[a : a + n]))
                a += n
            dp.step()
        except ValueError as e:
            error = str(e)
        untouched = not opt.state and all(
            torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)
        )
        dp.train_step(x, y, loss_fn)
        results[name] = {
            "error": error,
            "untouched": untouched,
            "params": [p.detach().clone() for p in model.parameters()],
        }
        dp.close()
    torch.save(results, Path(out) / f"rank{rank}.pt")
