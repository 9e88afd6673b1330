"""Experiment 8: RMSProp dividing by sigma (power 1/2) versus sigma^2 (power 1) on real data.

The lecture: Phi[i] -= eta g_hat[i]/sigma[i] (RMSProp, (1)) "seems to work better" than
Phi[i] -= eta g_hat[i]/sigma^2[i] ((2), the units-consistent, Gibbs-giving form), though (2) is
better motivated. We measure it: an MLP on MNIST-1D trained by :class:`sgdlab.RMSProp` with
``power=0.5`` and ``power=1.0``, each over a learning-rate grid (their lr have different units,
so each gets its own), and compare the best final training losses, with seeds for the spread.

Also the eps placement (REFERENCE.md erratum 8): the slide's sqrt(s + eps) is
``eps_placement="inside"``, torch's sqrt(s) + eps is ``"outside"``; both are checked in float64
against a hand-written update and torch.optim.RMSprop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...optim import RMSProp as SgdlabRMSProp
from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from . import _mnist
from ._common import chain_mean, with_curves

NAME = "rmsprop_power"
TITLE = "8. RMSProp dividing by sigma versus sigma^2, each at its best learning rate"
DESCRIPTION = (
    "An MLP on MNIST-1D trained with sgdlab.RMSProp dividing by the root of the second moment "
    "(sigma, torch's RMSProp) and by the second moment itself (sigma^2, the units-consistent "
    "form). Each gets its own learning-rate grid; the figure shows final training loss against "
    "lr, and the claim compares the two best losses over several seeds. The two eps placements "
    "(slide: inside the root; torch: outside) are checked exactly against hand-written updates."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {
        "alpha": Range(ge=0, lt=1),
        "seeds": Range(ge=2),
        "grid_extensions": Range(ge=0, le=10),
    }

    lrs_sigma: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    lrs_sigma2: tuple[float, ...] = (3e-7, 1e-6, 3e-6, 1e-5)
    alpha: float = 0.99
    eps: float = 1e-8
    batch_size: int = 32
    examples: int = 16384
    seeds: int = 3
    hidden: int = 64
    grid_extensions: int = 2


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "lrs_sigma": (3e-3, 1e-2),
        "lrs_sigma2": (1e-6, 3e-6),
        "examples": 6144,
        "seeds": 2,
        "grid_extensions": 1,
    },
    "full": {
        "lrs_sigma": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        "lrs_sigma2": (3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4),
        "examples": 65536,
        "seeds": 4,
    },
}


def _eps_identities(config: Config) -> dict[str, float]:
    gen = torch.Generator().manual_seed(config.seed)
    w0 = torch.randn(20, generator=gen, dtype=torch.float64)
    grads = torch.randn(50, 20, generator=gen, dtype=torch.float64)
    lr, alpha, eps = 1e-2, config.alpha, 1e-3  # eps large enough for placement to matter
    p_in, p_out, p_torch = (torch.nn.Parameter(w0.clone()) for _ in range(3))
    o_in = SgdlabRMSProp([p_in], lr=lr, alpha=alpha, eps=eps, eps_placement="inside")
    o_out = SgdlabRMSProp([p_out], lr=lr, alpha=alpha, eps=eps, eps_placement="outside")
    o_torch = torch.optim.RMSprop([p_torch], lr=lr, alpha=alpha, eps=eps)
    phi, s = w0.clone(), torch.zeros_like(w0)
    dev_in = dev_out = gap = 0.0
    for g in grads:
        for p, o in ((p_in, o_in), (p_out, o_out), (p_torch, o_torch)):
            p.grad = g.clone()
            o.step()
        s = alpha * s + (1 - alpha) * g * g
        phi = phi - lr * g / (s + eps).sqrt()
        dev_in = max(dev_in, float((p_in.detach() - phi).abs().max()))
        dev_out = max(dev_out, float((p_out.detach() - p_torch.detach()).abs().max()))
        gap = max(gap, float((p_in.detach() - p_out.detach()).abs().max()))
    return {"inside_vs_slide": dev_in, "outside_vs_torch": dev_out, "inside_vs_outside": gap}


def _train(power: float, lr: float, seed: int, data: _mnist.Data, config: Config) -> float:
    model = _mnist.mlp(config.hidden, seed, config.device)
    opt = SgdlabRMSProp(model.parameters(), lr=lr, alpha=config.alpha, eps=config.eps, power=power)
    res = _mnist.train(model, opt, data, config.batch_size, config.examples, seed=seed, evals=4)
    return float(res["final_loss"])


def _edge(grid: list[dict[str, float]]) -> int:
    """-1 / +1 when the grid's best (finite) loss is at its lowest / highest lr, else 0."""
    losses = [g["loss"] if np.isfinite(g["loss"]) else np.inf for g in grid]
    if len(grid) < 2 or not np.isfinite(min(losses)):
        return 0
    i = int(np.argmin(losses))
    return -1 if i == 0 else 1 if i == len(grid) - 1 else 0


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    data = _mnist.load(outdir, config.device)
    grids: dict[str, list[dict[str, float]]] = {}
    best: dict[str, dict[str, Any]] = {}
    for name, power, lrs in (("sigma", 0.5, config.lrs_sigma), ("sigma2", 1.0, config.lrs_sigma2)):
        grid = [
            {"lr": lr, "loss": _train(power, lr, config.seed, data, config)}
            for lr in bar(lrs, desc=f"{NAME} {name}")
        ]
        for _ in range(config.grid_extensions):  # a best lr on the edge: one step beyond it
            side = _edge(grid)
            if not side:
                break
            lr = (
                grid[-1]["lr"] * grid[-1]["lr"] / grid[-2]["lr"]
                if side > 0
                else grid[0]["lr"] * grid[0]["lr"] / grid[1]["lr"]
            )
            grid = sorted(
                grid + [{"lr": lr, "loss": _train(power, lr, config.seed, data, config)}],
                key=lambda g: g["lr"],
            )
        grids[name] = grid
        finite = [g for g in grid if np.isfinite(g["loss"])]
        lr_best = min(finite, key=lambda g: g["loss"])["lr"] if finite else lrs[0]
        losses = [next(g["loss"] for g in grid if g["lr"] == lr_best)]
        losses += [
            _train(power, lr_best, config.seed + k, data, config) for k in range(1, config.seeds)
        ]
        best[name] = {"lr": lr_best, "losses": losses}
    diff = np.array(best["sigma2"]["losses"]) - np.array(best["sigma"]["losses"])
    d, d_se = chain_mean(diff) if diff.size > 1 else (float(diff[0]), float("nan"))
    return {
        "grids": grids,
        "best": best,
        "diff": d,
        "diff_se": d_se,
        "seeds": config.seeds,
        "identities": _eps_identities(config),
    }


def _undecided(results: dict[str, Any]) -> str:
    """Why the sigma/sigma^2 comparison is not decided: a best lr on its grid's edge, or a
    difference within 4 standard errors of 0 (the seeds cannot tell which is better)."""
    edges = [n for n, g in results["grids"].items() if _edge(g)]
    if edges:
        return f"best lr on the grid's edge after extending it ({', '.join(edges)})"
    d, se = results["diff"], results["diff_se"]
    if not (math.isfinite(se) and abs(d) > 4 * se):
        return f"difference {d:.3g} within 4 s.e. ({se:.2g}) of 0: more seeds needed"
    return ""


def claims(results: dict[str, Any]) -> list[Claim]:
    ident = results["identities"]
    b = results["best"]
    return [
        Claim(
            "rmsprop_power.sigma_better",
            "the lecture: dividing by sigma (RMSProp) works "
            "better than by sigma^2, each at its best lr (MNIST-1D, final training loss)",
            "L_best(sigma^2) - L_best(sigma) > 0 (decided beyond 4 s.e.)",
            0.0,
            results["diff"],
            results["diff_se"],
            tolerance(0.0, k=0.0),
            kind="at_least",
            exact=False,
            seeds=int(results.get("seeds", len(b["sigma"]["losses"]))),
            inconclusive=_undecided(results),
            note=f"best lr: sigma {b['sigma']['lr']:g}, sigma^2 {b['sigma2']['lr']:g}; "
            f"mean losses {np.mean(b['sigma']['losses']):.4g} vs "
            f"{np.mean(b['sigma2']['losses']):.4g}",
        ),
        Claim(
            "rmsprop_power.eps_inside",
            "eps_placement='inside' is the slide's Phi -= eta g/sqrt(s + eps) (float64)",
            "max |Phi_sgdlab - Phi_slide| = 0",
            0.0,
            ident["inside_vs_slide"],
            0.0,
            1e-13,
            erratum=8,
            lecture_formula="sqrt(s + eps) only",
            note=f"the placements differ by {ident['inside_vs_outside']:.3g} at eps=1e-3",
        ),
        Claim(
            "rmsprop_power.eps_outside_torch",
            "eps_placement='outside' is torch.optim.RMSprop's sqrt(s) + eps (float64)",
            "max |Phi_sgdlab - Phi_torch| = 0",
            0.0,
            ident["outside_vs_torch"],
            0.0,
            1e-13,
            erratum=8,
            lecture_formula="sqrt(s + eps) only",
        ),
    ]


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure(2, 1)
    for a, (name, grid) in zip(ax[0], results["grids"].items()):
        lr = [g["lr"] for g in grid]
        loss = [g["loss"] if np.isfinite(g["loss"]) else np.nan for g in grid]
        a.plot(lr, loss, "o-")
        a.set(
            xscale="log",
            yscale="log",
            xlabel="lr",
            ylabel="final training loss",
            title=f"RMSProp dividing by {'sigma' if name == 'sigma' else 'sigma^2'}",
        )
    return [save(fig, outdir, "rmsprop_power.png")]
