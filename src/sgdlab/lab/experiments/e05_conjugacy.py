"""Experiment 5: conjugacy of SGD hyperparameters on real data (MNIST-1D).

The lecture's reparameterisation: with momentum horizon N_g (beta = 1 - 1/N_g, heavy ball
v = beta v + eta g_hat, Phi -= v) the per-step rate eta = eta'/N_g keeps the update per unit of
averaged gradient at eta', so the best eta' should not move with N_g (conjugacy:
d^2 f/(d eta' d N_g) = 0; REFERENCE.md erratum 5 fixes the slide's wording), while the best
per-step eta moves like 1/N_g. Likewise with eta = B eta'_ex (eta'_ex per example) the best
eta'_ex should not move with the batch size B. An MLP on MNIST-1D is trained over three grids,
(eta', N_g), (eta, N_g) and (eta'_ex, B), for the same number of examples; heatmaps show the
final training loss (geometric mean over seeds) and the claims how far (in octaves) the best
value moves, with a standard error from the seeds' own best values. A row whose best value sits
on the edge of its grid gets one more octave beyond it, at most ``grid_extensions`` times; a best
value still on the edge leaves its claims inconclusive.

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

from ..claims import Claim, decides, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from . import _mnist
from ._common import seed_mean, with_curves

NAME = "conjugacy"
TITLE = "5. Conjugacy on real data: (eta', N_g), (eta, N_g) and (eta', B) on MNIST-1D"
DESCRIPTION = (
    "Final training loss of an MLP on MNIST-1D (geometric mean over seeds) over three grids, "
    "(a), (b) and (c): the lecture's conjugate "
    "learning rate eta' against the momentum horizon N_g (per-step lr = eta'/N_g), the plain "
    "per-step lr eta against N_g, and the per-example rate eta' against the batch size B "
    "(lr = B eta'). In conjugate units the valley of good learning rates is a vertical band: "
    "the best eta' stays put as N_g or B change, while the best per-step eta moves like 1/N_g. "
    "Colour: log10 of the final loss; star: the best learning rate of each row (the grid's "
    "minimum refined by a parabola); blank: diverged."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {
        "octaves": Range(ge=-30, le=30),
        "eta_octaves": Range(ge=-30, le=30),
        "seeds": Range(ge=2),
        "grid_extensions": Range(ge=0, le=10),
    }

    n_g: tuple[float, ...] = (1.0, 8.0)
    octaves: tuple[int, ...] = (-2, -1, 0, 1, 2)
    eta_octaves: tuple[int, ...] = (-5, -4, -3, -2, -1, 0, 1)
    base_lr: float = 0.4
    batch_size: int = 32
    batch_sizes: tuple[int, ...] = (8, 32, 128)
    examples: int = 8192
    hidden: int = 64
    seeds: int = 3
    grid_extensions: int = 2


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "octaves": (-1, 0, 1),
        "eta_octaves": (-4, -3, -2, -1, 0, 1),
        "batch_sizes": (8, 32, 128),
        "examples": 4096,
        "seeds": 2,
        "grid_extensions": 1,
    },
    "full": {
        "n_g": (1.0, 4.0, 16.0),
        "eta_octaves": tuple(range(-6, 3)),
        "batch_sizes": (8, 32, 128, 512),
        "examples": 32768,
        "seeds": 4,
    },
}


def _train(
    lr: float, momentum: float, b: int, data: _mnist.Data, config: Config, seed: int
) -> float:
    model = _mnist.mlp(config.hidden, seed, config.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    res = _mnist.train(model, opt, data, b, config.examples, seed=seed, evals=2)
    return float(res["final_loss"])


def _cell(grid: str, row: float, k: int, config: Config, data: _mnist.Data) -> dict[str, Any]:
    """One grid cell: its lr, momentum and batch, trained over the seeds; ``loss`` is the
    geometric mean of the seeds' final losses (``inf`` if any diverged)."""
    base, b0 = config.base_lr, config.batch_size
    lr, mom, b = {
        "eta_prime_ng": (base * 2.0**k / row, 1 - 1 / row, b0),
        "eta_ng": (base * 2.0**k, 1 - 1 / row, b0),
        "eta_prime_b": (base * 2.0**k * row / b0, 0.0, int(row)),
    }[grid]
    losses = [_train(lr, mom, b, data, config, config.seed + 1000 * s) for s in range(config.seeds)]
    mean = (
        math.exp(float(np.mean(np.log(losses))))
        if all(math.isfinite(v) for v in losses)
        else math.inf
    )
    return {"row": row, "octave": k, "lr": lr, "loss": mean, "losses": losses}


def _edge(cells: list[dict[str, Any]], row: float) -> int:
    """-1 / +1 when the best cell of ``row`` is its grid's lowest / highest octave, else 0."""
    mine = sorted((c for c in cells if c["row"] == row), key=lambda c: c["octave"])
    i = min(range(len(mine)), key=lambda j: mine[j]["loss"])
    return -1 if i == 0 else 1 if i == len(mine) - 1 else 0


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    data = _mnist.load(outdir, config.device)
    rows = {
        "eta_prime_ng": list(config.n_g),
        "eta_ng": list(config.n_g),
        "eta_prime_b": [float(b) for b in config.batch_sizes],
    }
    octs = {
        "eta_prime_ng": config.octaves,
        "eta_ng": config.eta_octaves,
        "eta_prime_b": config.octaves,
    }
    jobs = [(g, r, k) for g in rows for r in rows[g] for k in octs[g]]
    grids: dict[str, list[dict[str, Any]]] = {g: [] for g in rows}
    for g, r, k in bar(jobs, desc=NAME):
        grids[g].append(_cell(g, r, k, config, data))
    for _ in range(config.grid_extensions):  # a best lr on the edge: one octave beyond it
        for g in rows:
            for r in rows[g]:
                side = _edge(grids[g], r)
                if side:
                    ks = [c["octave"] for c in grids[g] if c["row"] == r]
                    grids[g].append(
                        _cell(g, r, (max(ks) + 1) if side > 0 else (min(ks) - 1), config, data)
                    )
    base = config.base_lr
    model = _mnist.mlp(config.hidden, config.seed, config.device)
    noise = _mnist.noise_scale(
        model,
        torch.optim.SGD(model.parameters(), lr=base),
        data,
        config.batch_size,
        config.examples,
        seed=config.seed,
    )
    dropped = [
        {
            "point": f"{g} row {c['row']:g}, octave {c['octave']}",
            "reason": "diverged (a non-finite loss in some seed): blank in the heatmap",
        }
        for g, cells in grids.items()
        for c in cells
        if not math.isfinite(c["loss"])
    ]
    dropped += [
        {
            "point": f"B={b}",
            "reason": f"above B_simple/2 = {noise['b_simple'] / 2:.0f}: "
            "left out of the invariance claim (in the drop claim)",
        }
        for b in config.batch_sizes
        if b not in _mnist.noise_dominated(config.batch_sizes, noise["b_simple"])
    ]
    return {
        "grids": grids,
        "base_lr": base,
        "n_g": list(config.n_g),
        "batch_sizes": list(config.batch_sizes),
        "ref_batch": config.batch_size,
        "noise": noise,
        "seeds": config.seeds,
        "dropped": dropped,
    }


def _best_octave(cells: list[dict[str, float]], row: float) -> float:
    """Position of the best learning rate in octaves: the grid's argmin, refined by the vertex
    of the parabola through log-loss at the argmin and its two neighbours (within +-1/2)."""
    mine = sorted(
        (c for c in cells if c["row"] == row and math.isfinite(c["loss"])),
        key=lambda c: c["octave"],
    )
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


# The best lr is located to ~1/2 octave (the vertex of a parabola through the grid's minimum);
# a shift is the difference of two such positions: one octave is the grid's resolution.
GRID_OCTAVES = 1.0
_NOTE = "best lr located to ~1/2 octave (parabola through the grid minimum); one octave allowed"


def _seed_cells(cells: list[dict[str, Any]], s: int) -> list[dict[str, Any]]:
    return [{**c, "loss": c["losses"][s]} for c in cells]


def _shift(
    cells: list[dict[str, Any]], r1: float, r2: float, seeds: int
) -> tuple[float, float, str]:
    """Best octave at row ``r2`` minus that at ``r1`` (grid of the seeds' mean), its standard
    error from the seeds' own shifts, and why it cannot be decided (a best value on an edge)."""
    shift = _best_octave(cells, r2) - _best_octave(cells, r1)
    per_seed = [
        _best_octave(_seed_cells(cells, s), r2) - _best_octave(_seed_cells(cells, s), r1)
        for s in range(seeds)
    ]
    _, se = seed_mean(per_seed)
    edges = [f"{r:g}" for r in (r1, r2) if _edge(cells, r)]
    why = (
        f"best lr on the grid's edge at row {', '.join(edges)} after extending it" if edges else ""
    )
    return shift, se, why


def _claim(
    cid: str,
    statement: str,
    formula: str,
    predicted: float,
    shift: tuple,
    effect: float,
    seeds: int,
    **kw: Any,
) -> Claim:
    value, se, why = shift
    tol = tolerance(se if math.isfinite(se) else 0.0, grid=GRID_OCTAVES)
    if not why and not decides(tol, effect):
        why = f"tolerance {float(tol):.2g} octaves exceeds the effect {effect:.2g}: more seeds"
    return Claim(
        cid,
        statement,
        formula,
        predicted,
        value,
        se,
        tol,
        exact=False,
        effect=effect,
        seeds=seeds,
        inconclusive=why,
        note=_NOTE,
        **kw,
    )


def claims(results: dict[str, Any]) -> list[Claim]:
    g = results["grids"]
    ng = results["n_g"]
    seeds = int(results["seeds"])
    lo, hi = ng[0], ng[-1]
    pred_e = -math.log2(hi / lo)
    out = [
        _claim(
            "conjugacy.best_eta_prime_shift_Ng",
            f"the best eta' does not move from "
            f"N_g={lo:g} to N_g={hi:g} (eta = eta'/N_g): eta' and N_g are conjugate",
            f"d^2 f/(d eta' d N_g) = 0: shift = 0 octaves (the per-step eta would move {pred_e:g})",
            0.0,
            _shift(g["eta_prime_ng"], lo, hi, seeds),
            pred_e,
            seeds,
        ),
        _claim(
            "conjugacy.best_eta_shift_Ng",
            f"the best per-step eta moves like 1/N_g from N_g={lo:g} to {hi:g}",
            "shift = -log2(N_g ratio) octaves (0 if eta were the invariant)",
            pred_e,
            _shift(g["eta_ng"], lo, hi, seeds),
            pred_e,
            seeds,
        ),
    ]
    bs = results["batch_sizes"]
    b_simple = results["noise"]["b_simple"]
    small = _mnist.noise_dominated(bs, b_simple)
    large = [b for b in bs if b > b_simple]
    if len(small) >= 2:
        alt = -math.log2(small[-1] / small[0])  # a per-step invariant lr would move this much
        out.append(
            _claim(
                "conjugacy.best_eta_prime_shift_B",
                f"the best per-example eta' does not move from "
                f"B={small[0]} to B={small[-1]} (eta = B eta'), batch sizes at most half the "
                f"measured noise scale B_simple = {b_simple:.0f}",
                f"shift = 0 octaves (a fixed per-step eta would move {alt:g})",
                0.0,
                _shift(g["eta_prime_b"], small[0], small[-1], seeds),
                alt,
                seeds,
            )
        )
    if large:
        b1, b2 = bs[0], large[-1]
        guide = -math.log2((b2 + b_simple) / (b1 + b_simple))
        shift, se, why = _shift(g["eta_prime_b"], b1, b2, seeds)
        out.append(
            Claim(
                "conjugacy.best_eta_prime_drop_B",
                f"beyond the noise scale (B_simple = "
                f"{b_simple:.0f}) the best per-example eta' drops: B={b1} to B={b2}",
                "shift <= 0 octaves (eta = B eta' saturates at the stability limit)",
                0.0,
                shift,
                se,
                tolerance(0.0),
                kind="at_most",
                exact=False,
                seeds=seeds,
                inconclusive=why,
                note=_NOTE + f"; McCandlish et al.'s eps_opt(B) with B_noise ~ "
                f"B_simple gives {guide:.2f} octaves",
            )
        )
    return out


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure(3, 1, width=4.2)
    titles = {
        "eta_prime_ng": ("eta' (octaves from base)", "N_g"),
        "eta_ng": ("per-step eta (octaves from base)", "N_g"),
        "eta_prime_b": ("eta' per example (octaves)", "B"),
    }
    for a, (name, cells) in zip(ax[0], results["grids"].items()):
        rows = sorted({c["row"] for c in cells})
        cols = sorted({c["octave"] for c in cells})
        z = np.full((len(rows), len(cols)), np.nan)
        for c in cells:
            v = c["loss"]
            z[rows.index(c["row"]), cols.index(c["octave"])] = (
                np.log10(v) if np.isfinite(v) else np.nan
            )
        im = a.imshow(
            z,
            aspect="auto",
            origin="lower",
            cmap="viridis_r",
            extent=(cols[0] - 0.5, cols[-1] + 0.5, -0.5, len(rows) - 0.5),
        )
        a.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
        for i, r in enumerate(rows):
            best = _best_octave(cells, r)
            if np.isfinite(best):
                a.plot(best, i, "r*", ms=10)  # refined (sub-octave) position of the best lr
        xl, yl = titles[name]
        a.set(xlabel=xl, ylabel=yl, title=f"{xl.split(' (')[0]} against {yl}: log10 loss")
        fig.colorbar(im, ax=a, shrink=0.8)
    return [save(fig, outdir, "conjugacy.png")]
