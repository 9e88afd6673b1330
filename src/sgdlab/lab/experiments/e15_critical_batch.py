"""Experiment 15: the critical batch size, measured two ways.

McCandlish, Kaplan, Amodei et al. (2018), "An empirical model of large-batch training": with
the best learning rate at each batch size B, the steps S and examples E = S B needed to reach a
target loss trade off as (S/S_min - 1)(E/E_min - 1) = 1, i.e. S = S_min (1 + B_crit/B), and the
critical batch B_crit = E_min/S_min is predicted by the simple noise scale
B_simple = tr Sigma/|G|^2 measured during training.

We train an MLP on MNIST-1D with SGD (lr = B eta', a small lr grid per B) and record the examples
to reach a target training loss, fit S = S_min + E_min/B, and compare B_crit = E_min/S_min with
B_simple read by :class:`sgdlab.stats.NoiseMeter` from the augmented backward
(:func:`sgdlab.stats.track`) during a reference run, at the point where it reaches the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ... import stats
from ..claims import Claim
from ..config import ExperimentConfig
from ..plotting import figure, save
from ..progress import bar
from . import _mnist

NAME = "critical_batch"
TITLE = "15. Critical batch size: the noise meter's B_simple against the measured trade-off"
DESCRIPTION = (
    "Left: steps against examples needed to reach a target training loss on MNIST-1D, one "
    "point per batch size (best of a small learning-rate grid), with the fitted hyperbola "
    "(S/S_min - 1)(E/E_min - 1) = 1. Right: the simple noise scale B_simple = tr Sigma/|G|^2 "
    "read by the noise meter from the augmented backward during training, with the critical "
    "batch B_crit = E_min/S_min of the fit. McCandlish et al. find B_simple a fair predictor of "
    "B_crit (same order of magnitude); we measure the ratio."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    batch_sizes: tuple[int, ...] = (8, 32, 128, 512)
    eta_prime: float = 0.4 / 32
    lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0)
    max_lr: float = 3.0
    target_loss: float = 1.3
    max_examples: int = 65536
    evals: int = 48
    meter_batch: int = 32
    hidden: int = 64


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"batch_sizes": (8, 64, 256), "lr_multipliers": (1.0, 2.0), "target_loss": 1.6,
             "max_examples": 24576, "evals": 24},
    "full": {"batch_sizes": (8, 16, 32, 64, 128, 256, 512, 1024),
             "lr_multipliers": (0.5, 1.0, 2.0, 4.0), "target_loss": 1.1,
             "max_examples": 262144, "evals": 96},
}


def _meter_run(config: Config, data: _mnist.Data) -> dict[str, Any]:
    b = config.meter_batch
    model = _mnist.mlp(config.hidden, config.seed, config.device)
    tracker = stats.track(model)
    meter = stats.NoiseMeter(model, batch_size=tracker, beta=0.95)
    opt = torch.optim.SGD(model.parameters(), lr=min(config.max_lr, b * config.eta_prime))
    readings: dict[int, float] = {}

    def read(step: int) -> None:
        readings[step] = meter.update().b_simple_smoothed

    res = _mnist.train(model, opt, data, b, config.max_examples, seed=config.seed,
                       evals=config.evals, after_backward=read, stop_below=config.target_loss)
    tracker.detach()
    curve = [{**p, "b_simple": readings[p["step"]]} for p in res["curve"]]
    return {"curve": curve, "batch_size": b}


def run(config: Config, outdir: Path) -> dict[str, Any]:
    data = _mnist.load(outdir, config.device)
    jobs = sorted({(b, min(config.max_lr, m * b * config.eta_prime))
                   for b in config.batch_sizes for m in config.lr_multipliers})
    runs = []
    for b, lr in bar(jobs, desc=NAME):
        model = _mnist.mlp(config.hidden, config.seed, config.device)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        res = _mnist.train(model, opt, data, b, config.max_examples, seed=config.seed + b,
                           evals=config.evals, stop_below=config.target_loss)
        e = _mnist.examples_to_reach(res["curve"], config.target_loss)
        runs.append({"B": b, "lr": lr, "examples": e})
    best = []
    for b in config.batch_sizes:
        es = [r["examples"] for r in runs if r["B"] == b and math.isfinite(r["examples"])]
        if es:
            best.append({"B": b, "examples": min(es), "steps": min(es) / b})
    fit: dict[str, float] = {"s_min": float("nan"), "e_min": float("nan"), "b_crit": float("nan")}
    if len(best) >= 2:
        inv_b = np.array([1 / p["B"] for p in best])
        s = np.array([p["steps"] for p in best])
        a = np.vstack([np.ones_like(inv_b), inv_b]).T
        (s_min, e_min), *_ = np.linalg.lstsq(a, s, rcond=None)
        fit = {"s_min": float(s_min), "e_min": float(e_min),
               "b_crit": float(e_min / s_min) if s_min > 0 else float("nan")}
    meter = _meter_run(config, data)
    at_target = [p for p in meter["curve"] if p["loss"] <= config.target_loss * 1.25]
    b_simple = at_target[0]["b_simple"] if at_target else meter["curve"][-1]["b_simple"]
    return {"runs": runs, "best": best, "fit": fit, "meter": meter, "b_simple": b_simple,
            "target_loss": config.target_loss}


def claims(results: dict[str, Any]) -> list[Claim]:
    bc, bs = results["fit"]["b_crit"], results["b_simple"]
    ratio = math.log10(bc / bs) if bc > 0 and bs > 0 and math.isfinite(bc) else float("nan")
    return [
        Claim("critical_batch.b_simple_predicts_b_crit", "the noise meter's B_simple predicts "
              "the critical batch B_crit = E_min/S_min of the steps/examples trade-off (same "
              "order of magnitude)", "log10(B_crit/B_simple) = 0 (within a decade)", 0.0, ratio,
              float("nan"), 1.0, exact=False,
              note=f"B_crit = {bc:.3g} (fit), B_simple = {bs:.3g} (meter near the target loss "
              f"{results['target_loss']:g})"),
    ]


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure(2, 1)
    a = ax[0, 0]
    best = results["best"]
    fit = results["fit"]
    if best:
        a.plot([p["examples"] for p in best], [p["steps"] for p in best], "o", label="measured")
        for p in best:
            a.annotate(f"B={p['B']}", (p["examples"], p["steps"]), fontsize=7)
    if math.isfinite(fit["b_crit"]) and fit["s_min"] > 0:
        bgrid = np.geomspace(1, 4096, 100)
        s = fit["s_min"] * (1 + fit["b_crit"] / bgrid)
        a.plot(s * bgrid, s, "-", label=f"fit, B_crit = {fit['b_crit']:.3g}")
    a.set(xscale="log", yscale="log", xlabel="examples to target", ylabel="steps to target",
          title=f"target loss {results['target_loss']:g}")
    a.legend(fontsize=7)
    a = ax[0, 1]
    curve = results["meter"]["curve"]
    a.plot([p["examples"] for p in curve], [p["b_simple"] for p in curve], "o-", ms=3,
           label="B_simple (smoothed)")
    if math.isfinite(fit["b_crit"]):
        a.axhline(fit["b_crit"], color="C1", ls="--", label="B_crit (fit)")
    a.set(yscale="log", xlabel="examples seen", ylabel="batch size",
          title=f"noise meter, B = {results['meter']['batch_size']}")
    a.legend(fontsize=7)
    return [save(fig, outdir, "critical_batch.png")]
