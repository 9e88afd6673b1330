"""Training loops on MNIST-1D shared by the real-data experiments.

A small MLP (40 -> hidden -> hidden -> 10, ReLU) trained with mean cross-entropy over the
batch, batches drawn with replacement from a torch.Generator, so that runs are reproducible
and independent of the batch size's divisibility into the data set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ._common import mnist1d

__all__ = [
    "Data",
    "evaluate",
    "examples_to_reach",
    "load",
    "mlp",
    "noise_dominated",
    "noise_scale",
    "train",
]


class Data:
    """MNIST-1D tensors on a device: ``x``, ``y`` (train) and ``x_test``, ``y_test``."""

    def __init__(self, arrays: dict[str, np.ndarray], device: str) -> None:
        self.device = torch.device(device)
        self.x = torch.as_tensor(arrays["x"], device=self.device)
        self.y = torch.as_tensor(arrays["y"], device=self.device)
        self.x_test = torch.as_tensor(arrays["x_test"], device=self.device)
        self.y_test = torch.as_tensor(arrays["y_test"], device=self.device)


def load(outdir: str | os.PathLike[str], device: str = "cpu", num_samples: int = 5000) -> Data:
    """MNIST-1D (generated locally, cached beside the results) on ``device``."""
    return Data(mnist1d(outdir, num_samples=num_samples), device)


def mlp(hidden: int = 128, seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """The MLP 40 -> hidden -> hidden -> 10 with torch's default init under ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(40, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    ).to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return loss, acc


def train(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: Data,
    batch_size: int,
    examples: int,
    *,
    seed: int = 0,
    lr_at: Callable[[int], float] | None = None,
    evals: int = 20,
    before_step: Callable[[torch.nn.Module], None] | None = None,
    after_backward: Callable[[int], None] | None = None,
    on_eval: Callable[[int, torch.nn.Module], None] | None = None,
    stop_below: float | None = None,
) -> dict[str, Any]:
    """Train for ``examples // batch_size`` steps; return the training-loss curve.

    ``lr_at(step)`` (optional) sets every group's lr before each step. The full training loss is
    evaluated at ``evals`` points evenly spaced in examples seen (and at the end). A non-finite
    loss ends the run early and is recorded as ``inf`` (a diverged configuration).
    ``after_backward(step)`` runs between backward and the optimizer step (e.g. a noise meter);
    ``stop_below`` ends the run at the first evaluation whose loss is at or below it.
    """
    steps = max(1, examples // batch_size)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = data.x.shape[0]
    marks = sorted({max(1, round(steps * k / evals)) for k in range(1, evals + 1)})
    curve: list[dict[str, float]] = []
    diverged = False
    for step in range(1, steps + 1):
        if lr_at is not None:
            for g in opt.param_groups:
                g["lr"] = lr_at(step - 1)
        idx = torch.randint(0, n, (batch_size,), generator=gen).to(data.device)
        opt.zero_grad(set_to_none=True)
        if before_step is not None:
            before_step(model)
        loss = torch.nn.functional.cross_entropy(model(data.x[idx]), data.y[idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        opt.step()
        if step in marks:
            tl, _ = evaluate(model, data.x, data.y)
            if not math.isfinite(tl):
                diverged = True
                break
            curve.append({"step": step, "examples": step * batch_size, "loss": tl})
            if on_eval is not None:
                on_eval(step, model)
            if stop_below is not None and tl <= stop_below:
                break
    final = curve[-1]["loss"] if curve and not diverged else float("inf")
    return {"curve": curve, "final_loss": final, "diverged": diverged, "steps": steps}


def examples_to_reach(curve: list[dict[str, float]], target: float) -> float:
    """Examples seen when the loss curve first reaches ``target`` (log-linear interpolation
    between evaluations); ``nan`` if it never does."""
    prev = None
    for p in curve:
        if p["loss"] <= target:
            if prev is None or prev["loss"] <= target:
                return float(p["examples"])
            f = (math.log(prev["loss"]) - math.log(target)) / (
                math.log(prev["loss"]) - math.log(p["loss"])
            )
            return float(prev["examples"] + f * (p["examples"] - prev["examples"]))
        prev = p
    return float("nan")


def noise_scale(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: Data,
    batch_size: int,
    examples: int,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Train like :func:`train` and measure the gradient noise scale along the run.

    Every step reads the unbiased tr Sigma and |G|^2 of its batch from the augmented backward
    (:class:`sgdlab.stats.NoiseMeter`); B_simple = mean tr Sigma / mean |G|^2 over the run
    (McCandlish et al. 2018: numerator and denominator averaged separately, since the ratio of
    one step's estimates is biased and often negative). The standard error is the delta
    method's, treating steps as independent (consecutive steps correlate: a rough guide).
    """
    from ... import stats

    tracker = stats.track(model)
    meter = stats.NoiseMeter(model, batch_size=batch_size)
    tr: list[float] = []
    sq: list[float] = []

    def read(step: int) -> None:
        r = meter.update()
        tr.append(r.tr_sigma)
        sq.append(r.grad_sq_norm)

    try:
        res = train(model, opt, data, batch_size, examples, seed=seed, evals=1, after_backward=read)
    finally:
        tracker.detach()
    t, q = np.asarray(tr), np.asarray(sq)
    b = float(t.mean() / q.mean())
    se = abs(b) * math.sqrt(
        t.var(ddof=1) / t.mean() ** 2 / t.size + q.var(ddof=1) / q.mean() ** 2 / q.size
    )
    return {
        "b_simple": b,
        "b_simple_se": se,
        "tr_sigma_mean": float(t.mean()),
        "grad_sq_norm_mean": float(q.mean()),
        "steps": int(t.size),
        "batch_size": batch_size,
        "final_loss": res["final_loss"],
    }


def noise_dominated(batch_sizes: Sequence[int], b_simple: float) -> list[int]:
    """The batch sizes at most ``b_simple / 2``: where a batch still averages mostly noise.

    The lecture's batch-size rules are first-order in the step (its derivation replaces
    Phi_{t+1} by Phi_t inside the gradient), which holds while B is below the noise scale; with
    McCandlish et al.'s eps_opt(B) = eps_max/(1 + B_noise/B) the linear rule is off by the factor
    1 + B/B_noise, under 0.6 octave at B = B_noise/2 (taking B_noise ~ B_simple).
    """
    return [b for b in batch_sizes if b <= b_simple / 2]
