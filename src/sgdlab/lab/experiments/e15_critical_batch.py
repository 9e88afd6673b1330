"""Experiment 15: the critical batch size, measured two ways.

McCandlish, Kaplan, Amodei et al. (2018), "An empirical model of large-batch training": with
the best learning rate at each batch size B, the steps S and examples E = S B needed to reach a
target loss trade off as (S/S_min - 1)(E/E_min - 1) = 1, i.e. S = S_min (1 + B_crit/B), and the
critical batch B_crit = E_min/S_min is predicted by the simple noise scale
B_simple = tr Sigma/|G|^2 measured during training.

We train an MLP on MNIST-1D with SGD (lr = B eta', a small lr grid per B) over several seeds
and record the examples to reach a target training loss (mean and standard error over seeds at
the best lr; a best lr on the grid's edge extends the grid, a bounded number of times), fit
S = S_min + E_min/B by weighted least squares, and compare B_crit = E_min/S_min with B_simple
read by :class:`sgdlab.stats.NoiseMeter` from the augmented backward (:func:`sgdlab.stats.track`)
during a reference run per seed, at the point where it reaches the target. A batch size that
never reaches the target, or whose best lr stays on the grid's edge, is dropped and listed with
why; fewer than ``min_fit_points`` points, or a tolerance over a decade, leave the claim
inconclusive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ... import stats
from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from . import _mnist
from ._common import with_curves

NAME = "critical_batch"
TITLE = "15. Critical batch size: the noise meter's B_simple against the measured trade-off"
DESCRIPTION = (
    "(a) Steps against examples needed to reach a target training loss on MNIST-1D, one point "
    "per batch size at its best learning rate (mean over seeds, error bars one standard "
    "error), with the fitted hyperbola (S/S_min - 1)(E/E_min - 1) = 1. Batch sizes that never "
    "reached the target, or whose best rate stayed on the edge of its grid, are left out and "
    "listed. (b) The simple noise scale B_simple = tr Sigma/|G|^2 read by the noise meter from "
    "the augmented backward during training (one line per seed), with the critical batch "
    "B_crit = E_min/S_min of the fit. McCandlish et al. find B_simple a fair predictor of "
    "B_crit; we measure the ratio."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    # seeds >= 2 for a standard error; a line through S = S_min + E_min/B needs 3 points
    RANGES: ClassVar[Mapping[str, Range]] = {
        "seeds": Range(ge=2),
        "min_fit_points": Range(ge=3),
        "grid_extensions": Range(ge=0),
    }

    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    eta_prime: float = 0.4 / 32
    lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    grid_extensions: int = 2
    max_lr: float = 3.0
    target_loss: float = 1.3
    max_examples: int = 65536
    evals: int = 48
    meter_batch: int = 32
    hidden: int = 64
    seeds: int = 3
    min_fit_points: int = 4


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "batch_sizes": (8, 32, 64, 256),
        "lr_multipliers": (1.0, 2.0),
        "target_loss": 1.6,
        "max_examples": 24576,
        "evals": 24,
        "seeds": 2,
        "grid_extensions": 1,
        "min_fit_points": 3,
    },
    "full": {
        "batch_sizes": (8, 16, 32, 64, 128, 256, 512, 1024),
        "lr_multipliers": (0.5, 1.0, 2.0, 4.0),
        "target_loss": 1.1,
        "max_examples": 262144,
        "evals": 96,
        "seeds": 5,
    },
}

# The claim's stated model error, in decades: B_simple = tr Sigma/|G|^2 ignores the curvature
# (B_noise = tr(H Sigma)/G^T H G); McCandlish et al. find the two within a factor of a few. We
# allow a factor 2, and decide the claim only when the whole tolerance is at most half a decade
# (a factor ~3): a wider one cannot tell a prediction from an order-of-magnitude coincidence.
MODEL_DECADES = math.log10(2.0)
MAX_DECADES = 0.5


def _meter_run(config: Config, data: _mnist.Data, seed: int) -> dict[str, Any]:
    """A reference run at ``meter_batch`` read by the noise meter every step. B_simple near the
    target is mean tr Sigma / mean |G|^2 over the steps from the first evaluation within 25% of
    the target loss to the end (McCandlish et al.: numerator and denominator averaged apart; the
    smoothed reading at one step is far noisier); the smoothed readings are kept for the plot."""
    b = config.meter_batch
    model = _mnist.mlp(config.hidden, seed, config.device)
    tracker = stats.track(model)
    meter = stats.NoiseMeter(model, batch_size=tracker, beta=0.95)
    opt = torch.optim.SGD(model.parameters(), lr=min(config.max_lr, b * config.eta_prime))
    smoothed: dict[int, float] = {}
    tr: list[float] = []
    sq: list[float] = []

    def read(step: int) -> None:
        r = meter.update()
        smoothed[step] = r.b_simple_smoothed
        tr.append(r.tr_sigma)
        sq.append(r.grad_sq_norm)

    res = _mnist.train(
        model,
        opt,
        data,
        b,
        config.max_examples,
        seed=seed,
        evals=config.evals,
        after_backward=read,
        stop_below=config.target_loss,
    )
    tracker.detach()
    curve = [{**p, "b_simple": smoothed[p["step"]]} for p in res["curve"]]
    near = [p["step"] for p in curve if p["loss"] <= config.target_loss * 1.25]
    first = near[0] if near else max(1, 3 * len(tr) // 4)
    t, q = np.asarray(tr[first - 1 :]), np.asarray(sq[first - 1 :])
    return {
        "curve": curve,
        "batch_size": b,
        "seed": seed,
        "b_simple": float(t.mean() / q.mean()),
        "window_steps": int(t.size),
    }


def _examples(config: Config, data: _mnist.Data, b: int, lr: float) -> list[float]:
    """Examples to the target at batch ``b`` and step ``lr``, one per seed (``nan``: never)."""
    out = []
    for k in range(config.seeds):
        seed = config.seed + 1000 * k
        model = _mnist.mlp(config.hidden, seed, config.device)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        res = _mnist.train(
            model,
            opt,
            data,
            b,
            config.max_examples,
            seed=seed + b,
            evals=config.evals,
            stop_below=config.target_loss,
        )
        out.append(_mnist.examples_to_reach(res["curve"], config.target_loss))
    return out


def _score(es: list[float]) -> float:
    """Mean examples over seeds; ``inf`` unless every seed reached the target."""
    return float(np.mean(es)) if all(math.isfinite(e) for e in es) else math.inf


def _batch_point(
    config: Config, data: _mnist.Data, b: int, runs: list[dict[str, Any]]
) -> tuple[dict[str, Any] | None, str]:
    """The best lr of batch ``b`` (extending its grid while the best sits on an edge) as a
    point ``{B, lr, examples, examples_se, steps, steps_se}``, or ``None`` and why."""
    lrs = sorted({m * b * config.eta_prime for m in config.lr_multipliers})
    lrs = [lr for lr in lrs if lr <= config.max_lr] or [config.max_lr]
    tried: dict[float, list[float]] = {}
    for _ in range(config.grid_extensions + 1):
        for lr in lrs:
            if lr not in tried:
                tried[lr] = _examples(config, data, b, lr)
                runs.append({"B": b, "lr": lr, "examples": tried[lr]})
        grid = sorted(tried)
        scores = [_score(tried[lr]) for lr in grid]
        if not any(math.isfinite(v) for v in scores):
            return None, (
                f"never reached the target loss {config.target_loss:g} within "
                f"{config.max_examples} examples at any lr of {_lrs(grid)}"
            )
        i = int(np.argmin(scores))
        if 0 < i < len(grid) - 1:
            break
        if i == len(grid) - 1 and grid[-1] >= config.max_lr:
            return None, f"best lr {grid[i]:.3g} at the cap max_lr = {config.max_lr:g}"
        nxt = grid[0] / 2 if i == 0 else min(grid[-1] * 2, config.max_lr)
        lrs = [nxt]
    else:
        return None, (
            f"best lr {grid[i]:.3g} on the edge of its grid {_lrs(grid)} after "
            f"{config.grid_extensions} extensions"
        )
    es = np.asarray(tried[grid[i]])
    e, e_se = float(es.mean()), float(es.std(ddof=1) / math.sqrt(es.size))
    return {
        "B": b,
        "lr": grid[i],
        "examples": e,
        "examples_se": e_se,
        "steps": e / b,
        "steps_se": e_se / b,
    }, ""


def _lrs(grid: list[float]) -> str:
    return "(" + ", ".join(f"{lr:.3g}" for lr in grid) + ")"


def _fit(best: list[dict[str, Any]]) -> dict[str, float]:
    """Weighted least squares of S = S_min + E_min/B (weights 1/se^2 of S), and B_crit =
    E_min/S_min with its delta-method standard error from the fit's covariance."""
    nan = float("nan")
    fit = {"s_min": nan, "e_min": nan, "b_crit": nan, "b_crit_se": nan, "points": len(best)}
    if len(best) < 3:
        return fit
    inv_b = np.array([1 / p["B"] for p in best])
    s = np.array([p["steps"] for p in best])
    se = np.array([max(p["steps_se"], 1e-3 * p["steps"]) for p in best])
    a = np.vstack([np.ones_like(inv_b), inv_b]).T / se[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(a, s / se, rcond=None)
    resid = (s - s_min - e_min * inv_b) / se
    chi2 = float(resid @ resid) / (len(best) - 2)
    cov = np.linalg.inv(a.T @ a) * max(1.0, chi2)  # scatter beyond the error bars widens it
    fit.update(s_min=float(s_min), e_min=float(e_min), chi2_dof=chi2)
    if s_min > 0 and e_min > 0:
        bc = e_min / s_min
        g = np.array([-bc / s_min, 1 / s_min])  # d(E/S) / d(S_min, E_min)
        fit.update(b_crit=float(bc), b_crit_se=float(math.sqrt(g @ cov @ g)))
    return fit


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    data = _mnist.load(outdir, config.device)
    runs: list[dict[str, Any]] = []
    best, dropped = [], []
    for b in bar(config.batch_sizes, desc=NAME):
        point, why = _batch_point(config, data, b, runs)
        if point is None:
            dropped.append({"point": f"B={b}", "reason": why})
        else:
            best.append(point)
    meters = [_meter_run(config, data, config.seed + 1000 * k) for k in range(config.seeds)]
    bs = np.array([m["b_simple"] for m in meters])
    return {
        "runs": runs,
        "best": best,
        "dropped": dropped,
        "fit": _fit(best),
        "meters": meters,
        "b_simple": float(bs.mean()),
        "b_simple_se": float(bs.std(ddof=1) / math.sqrt(bs.size)),
        "target_loss": config.target_loss,
        "seeds": config.seeds,
        "min_fit_points": config.min_fit_points,
    }


def claims(results: dict[str, Any]) -> list[Claim]:
    fit = results["fit"]
    bc, bc_se = fit["b_crit"], fit["b_crit_se"]
    bs, bs_se = results["b_simple"], results["b_simple_se"]
    ok = bc > 0 and bs > 0 and math.isfinite(bc) and math.isfinite(bs)
    ratio = math.log10(bc / bs) if ok else float("nan")
    se = math.hypot(bc_se / bc, bs_se / bs) / math.log(10) if ok else float("nan")
    tol = tolerance(se, model_error=MODEL_DECADES)
    why = ""
    if fit["points"] < results["min_fit_points"]:
        why = (
            f"only {fit['points']} batch sizes reached the target (need "
            f"{results['min_fit_points']} to fit B_crit)"
        )
    elif not ok:
        why = "the fit gives no positive S_min and E_min: no B_crit"
    elif not float(tol) <= MAX_DECADES:
        why = (
            f"tolerance {float(tol):.2g} decades exceeds {MAX_DECADES:g} (s.e. B_crit "
            f"{bc_se / bc:.0%}, B_simple {bs_se / bs:.0%}): more seeds needed"
        )
    return [
        Claim(
            "critical_batch.b_simple_predicts_b_crit",
            "the noise meter's B_simple predicts "
            "the critical batch B_crit = E_min/S_min of the steps/examples trade-off",
            "log10(B_crit/B_simple) = 0 (B_simple ignores curvature: a factor 2 allowed)",
            0.0,
            ratio,
            se,
            tol,
            exact=False,
            seeds=int(results["seeds"]),
            inconclusive=why,
            note=f"B_crit = {bc:.3g} +- {bc_se:.2g} (fit of {fit['points']} batch sizes), "
            f"B_simple = {bs:.3g} +- {bs_se:.2g} (meter near the target loss "
            f"{results['target_loss']:g}); dropped: {len(results['dropped'])}",
        ),
    ]


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure(2, 1)
    a = ax[0, 0]
    best = results["best"]
    fit = results["fit"]
    if best:
        a.errorbar(
            [p["examples"] for p in best],
            [p["steps"] for p in best],
            xerr=[p["examples_se"] for p in best],
            yerr=[p["steps_se"] for p in best],
            fmt="o",
            ms=4,
            label=f"measured (mean of {results['seeds']} seeds)",
        )
        for p in best:
            a.annotate(
                f"B={p['B']}",
                (p["examples"], p["steps"]),
                fontsize=6,
                xytext=(4, 4),
                textcoords="offset points",
            )
    if math.isfinite(fit["b_crit"]) and fit["s_min"] > 0:
        lo = min(p["B"] for p in best) / 2
        hi = max(p["B"] for p in best) * 2
        bgrid = np.geomspace(lo, hi, 100)
        s = fit["s_min"] * (1 + fit["b_crit"] / bgrid)
        a.plot(s * bgrid, s, "-", label=f"fit, B_crit = {fit['b_crit']:.3g}")
    a.set(
        xscale="log",
        yscale="log",
        xlabel="examples to target",
        ylabel="steps to target",
        title=f"target loss {results['target_loss']:g}",
    )
    a.legend()
    a = ax[0, 1]
    for k, m in enumerate(results["meters"]):
        curve = m["curve"]
        a.plot(
            [p["examples"] for p in curve],
            [p["b_simple"] for p in curve],
            "-",
            lw=1,
            color="C0",
            alpha=0.8,
            label="B_simple (smoothed), per seed" if k == 0 else None,
        )
    a.axhline(
        results["b_simple"], color="C0", ls=":", label="B_simple near the target (mean of seeds)"
    )
    if math.isfinite(fit["b_crit"]):
        a.axhline(fit["b_crit"], color="C1", ls="--", label="B_crit (fit)")
        if math.isfinite(fit["b_crit_se"]):
            a.axhspan(
                max(fit["b_crit"] - fit["b_crit_se"], 1e-3),
                fit["b_crit"] + fit["b_crit_se"],
                color="C1",
                alpha=0.15,
            )
    a.set(
        yscale="log",
        xlabel="examples seen",
        ylabel="batch size",
        title=f"noise meter, B = {results['meters'][0]['batch_size']}",
    )
    a.legend()
    return [save(fig, outdir, "critical_batch.png")]
