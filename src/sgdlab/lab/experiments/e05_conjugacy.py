"""Experiment 5: conjugacy of SGD hyperparameters on real data (MNIST-1D).

The lecture's reparameterisation: with momentum horizon N_g (beta = 1 - 1/N_g, heavy ball
v = beta v + eta g_hat, Phi -= v) the per-step rate eta = eta'/N_g keeps the update per unit of
averaged gradient at eta', so the best eta' should not move with N_g (conjugacy:
d^2 f/(d eta' d N_g) = 0; REFERENCE.md erratum 5 fixes the slide's wording), while the best
per-step eta moves like 1/N_g. Likewise with eta = B eta'_ex (eta'_ex per example) the best
eta'_ex should not move with the batch size B. An MLP on MNIST-1D is trained over three grids,
(eta', N_g), (eta, N_g) and (eta'_ex, B), for the same number of examples; heatmaps show the
final training loss and the claims how far (in octaves) the best value moves.

The lecture derives eta = B eta' by replacing Phi_{t+1} with Phi_t inside the next gradient, a
first-order statement that holds while a batch averages mostly noise: B below the gradient noise
scale B_simple = tr Sigma/|G|^2 (McCandlish et al. 2018), measured here with the augmented
backward along the reference run (B0, base lr). The invariance claim compares the batch sizes up
to B_simple/2; for batch sizes beyond, the optimal step saturates at the stability limit
(eps_opt(B) = eps_max/(1 + B_noise/B)), so the best eta' = eps_opt/B must drop, which is claimed
as a direction (shift <= 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..claims import Claim
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from . import _mnist
from ._common import with_curves

NAME = "conjugacy"
TITLE = "5. Conjugacy on real data: (eta', N_g), (eta, N_g) and (eta', B) on MNIST-1D"
DESCRIPTION = (
    "Final training loss of an MLP on MNIST-1D over three grids: the lecture's conjugate "
    "learning rate eta' against the momentum horizon N_g (per-step lr = eta'/N_g), the plain "
    "per-step lr eta against N_g, and the per-example rate eta' against the batch size B "
    "(lr = B eta'). In conjugate units the valley of good learning rates is a vertical band: "
    "the best eta' stays put as N_g or B change, while the best per-step eta moves like 1/N_g."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {
        "octaves": Range(ge=-30, le=30),
        "eta_octaves": Range(ge=-30, le=30),
    }

    n_g: tuple[float, ...] = (1.0, 8.0)
    octaves: tuple[int, ...] = (-2, -1, 0, 1, 2)
    eta_octaves: tuple[int, ...] = (-5, -4, -3, -2, -1, 0, 1)
    base_lr: float = 0.4
    batch_size: int = 32
    batch_sizes: tuple[int, ...] = (8, 32, 128)
    examples: int = 16384
    hidden: int = 64


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"octaves": (-1, 0, 1), "eta_octaves": (-4, -3, -2, -1, 0, 1),
             "batch_sizes": (8, 32, 128), "examples": 4096},
    "full": {"n_g": (1.0, 4.0, 16.0), "eta_octaves": tuple(range(-6, 3)),
             "batch_sizes": (8, 32, 128, 512), "examples": 65536},
}


def _train(lr: float, momentum: float, b: int, data: _mnist.Data, config: Config) -> float:
    model = _mnist.mlp(config.hidden, config.seed, config.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    res = _mnist.train(model, opt, data, b, config.examples, seed=config.seed, evals=2)
    return float(res["final_loss"])


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    data = _mnist.load(outdir, config.device)
    base = config.base_lr
    jobs = []
    for n_g in config.n_g:
        for k in config.octaves:
            jobs.append(("eta_prime_ng", n_g, k, base * 2.0**k / n_g, 1 - 1 / n_g,
                         config.batch_size))
        for k in config.eta_octaves:
            jobs.append(("eta_ng", n_g, k, base * 2.0**k, 1 - 1 / n_g, config.batch_size))
    for b in config.batch_sizes:
        for k in config.octaves:
            jobs.append(("eta_prime_b", b, k, base * 2.0**k * b / config.batch_size, 0.0, b))
    grids: dict[str, list[dict[str, float]]] = {"eta_prime_ng": [], "eta_ng": [],
                                                 "eta_prime_b": []}
    for grid, row, k, lr, mom, b in bar(jobs, desc=NAME):
        grids[grid].append({"row": row, "octave": k, "lr": lr,
                            "loss": _train(lr, mom, b, data, config)})
    model = _mnist.mlp(config.hidden, config.seed, config.device)
    noise = _mnist.noise_scale(model, torch.optim.SGD(model.parameters(), lr=base), data,
                               config.batch_size, config.examples, seed=config.seed)
    return {"grids": grids, "base_lr": base, "n_g": list(config.n_g),
            "batch_sizes": list(config.batch_sizes), "ref_batch": config.batch_size,
            "noise": noise}


def _best_octave(cells: list[dict[str, float]], row: float) -> float:
    """Position of the best learning rate in octaves: the grid's argmin, refined by the vertex
    of the parabola through log-loss at the argmin and its two neighbours (within +-1/2)."""
    mine = sorted((c for c in cells if c["row"] == row and math.isfinite(c["loss"])),
                  key=lambda c: c["octave"])
    if not mine:
        return float("nan")
    i = min(range(len(mine)), key=lambda j: mine[j]["loss"])
    k = float(mine[i]["octave"])
    if 0 < i < len(mine) - 1 and mine[i + 1]["octave"] - mine[i - 1]["octave"] == 2:
        ym, y0, yp = (math.log(mine[j]["loss"]) for j in (i - 1, i, i + 1))
        curv = yp - 2 * y0 + ym
        if curv > 0:
            k += max(-0.5, min(0.5, -0.5 * (yp - ym) / curv))
    return k


_NOTE = "best lr located to ~1/2 octave (parabola through the grid minimum); one octave allowed"


def claims(results: dict[str, Any]) -> list[Claim]:
    g = results["grids"]
    ng = results["n_g"]
    lo, hi = ng[0], ng[-1]
    shift_p = _best_octave(g["eta_prime_ng"], hi) - _best_octave(g["eta_prime_ng"], lo)
    shift_e = _best_octave(g["eta_ng"], hi) - _best_octave(g["eta_ng"], lo)
    pred_e = -math.log2(hi / lo)
    out = [
        Claim("conjugacy.best_eta_prime_shift_Ng", f"the best eta' does not move from N_g={lo:g} "
              f"to N_g={hi:g} (eta = eta'/N_g): eta' and N_g are conjugate",
              "d^2 f/(d eta' d N_g) = 0: shift = 0 octaves", 0.0, shift_p, 0.5, 1.0,
              exact=False, note=_NOTE),
        Claim("conjugacy.best_eta_shift_Ng", f"the best per-step eta moves like 1/N_g from "
              f"N_g={lo:g} to {hi:g}", "shift = -log2(N_g ratio) octaves", pred_e, shift_e, 0.5,
              1.0, exact=False, note=_NOTE),
    ]
    bs = results["batch_sizes"]
    b_simple = results["noise"]["b_simple"]
    small = _mnist.noise_dominated(bs, b_simple)
    large = [b for b in bs if b > b_simple]
    best = {b: _best_octave(g["eta_prime_b"], b) for b in bs}
    if len(small) >= 2:
        out.append(Claim(
            "conjugacy.best_eta_prime_shift_B", f"the best per-example eta' does not move from "
            f"B={small[0]} to B={small[-1]} (eta = B eta'), batch sizes at most half the "
            f"measured noise scale B_simple = {b_simple:.0f}", "shift = 0 octaves", 0.0,
            best[small[-1]] - best[small[0]], 0.5, 1.0, exact=False, note=_NOTE))
    if large:
        b1, b2 = bs[0], large[-1]
        guide = -math.log2((b2 + b_simple) / (b1 + b_simple))
        out.append(Claim(
            "conjugacy.best_eta_prime_drop_B", f"beyond the noise scale (B_simple = "
            f"{b_simple:.0f}) the best per-example eta' drops: B={b1} to B={b2}",
            "shift <= 0 octaves (eta = B eta' saturates at the stability limit)", 0.0,
            best[b2] - best[b1], 0.5, 0.0, kind="at_most", exact=False,
            note=_NOTE + f"; McCandlish et al.'s eps_opt(B) with B_noise ~ B_simple gives "
            f"{guide:.2f} octaves"))
    return out


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure(3, 1, width=4.2)
    titles = {"eta_prime_ng": ("eta' (octaves from base)", "N_g"),
              "eta_ng": ("per-step eta (octaves from base)", "N_g"),
              "eta_prime_b": ("eta' per example (octaves)", "B")}
    for a, (name, cells) in zip(ax[0], results["grids"].items()):
        rows = sorted({c["row"] for c in cells})
        cols = sorted({c["octave"] for c in cells})
        z = np.full((len(rows), len(cols)), np.nan)
        for c in cells:
            v = c["loss"]
            z[rows.index(c["row"]), cols.index(c["octave"])] = np.log10(v) if np.isfinite(v) \
                else np.nan
        im = a.imshow(z, aspect="auto", origin="lower", cmap="viridis_r",
                      extent=(cols[0] - 0.5, cols[-1] + 0.5, -0.5, len(rows) - 0.5))
        a.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
        for i, r in enumerate(rows):
            best = _best_octave(cells, r)
            if np.isfinite(best):
                a.plot(best, i, "r*", ms=10)  # refined (sub-octave) position of the best lr
        xl, yl = titles[name]
        a.set(xlabel=xl, ylabel=yl, title="log10 final loss (star: best)")
        fig.colorbar(im, ax=a, shrink=0.8)
    return [save(fig, outdir, "conjugacy.png")]
