"""Experiment 13: two temperatures in 2-D, and which preconditioner gives one (Gibbs).

Separable loss L(x, y) = h_x x^2/2 + h_y y^2/2 with independent additive gradient noise of
standard deviations sigma_x != sigma_y. With per-coordinate learning rates eta_i, the stationary
law of each coordinate is Gibbs at its own temperature T_i = h_i Var_i, exactly
T_i = eta_i sigma_i^2/(B (2 - eta_i h_i)) for the discrete chain and eta_i sigma_i^2/(2B) in
the Langevin limit (:func:`sgdlab.dynamics.coordinate_temperatures`). Three choices:

* plain SGD, eta_i = eta: two temperatures, ratio sigma_x^2/sigma_y^2;
* eta_i = eta'/sigma_i^2 (the lecture's "theoretically motivated" (2)): one temperature, Gibbs;
* eta_i = eta'/sigma_i (RMSProp's (1)): T_i = eta' sigma_i/2, ratio sigma_x/sigma_y: two.

The temperatures are measured with the virial E[(x_i - x_i*) dL/dx_i] = T_i
(:func:`sgdlab.dynamics.estimate_temperatures`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...dynamics import (
    Separable,
    coordinate_temperatures,
    estimate_temperatures,
    simulate_sgd,
)
from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ._common import ratio_stderr, with_curves

NAME = "two_temperatures"
TITLE = "13. Two temperatures in 2-D: plain SGD, eta'/sigma^2 (Gibbs) and eta'/sigma (RMSProp)"
DESCRIPTION = (
    "Chains of SGD on a separable 2-D quadratic whose two coordinates have different gradient "
    "noise, with three per-coordinate learning-rate choices. The measured temperature of each "
    "coordinate (virial estimator) matches the exact discrete prediction. Only eta_i = "
    "eta'/sigma_i^2 gives one temperature (a Gibbs law); RMSProp's eta'/sigma_i leaves two, in "
    "ratio sigma_x/sigma_y, and plain SGD two in ratio sigma_x^2/sigma_y^2."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {"chains": Range(ge=2)}

    curvatures: tuple[float, ...] = (1.0, 1.0)
    noise_std: tuple[float, ...] = (2.0, 0.5)
    lr: float = 0.02
    eta_prime: float = 0.02
    steps: int = 3000
    chains: int = 1500


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 1500, "chains": 1000},
    "full": {"steps": 20000, "chains": 10000},
}


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    h = np.asarray(config.curvatures, float)
    s = np.asarray(config.noise_std, float)
    problem = Separable(h, s)
    schemes = {
        "plain": np.full(2, config.lr),
        "inverse_variance": config.eta_prime / s**2,
        "inverse_std": config.eta_prime / s,
    }
    rows = {}
    for i, (name, lrs) in enumerate(schemes.items()):
        t_exact = coordinate_temperatures(h, s**2, lrs, exact=True)
        init = np.random.default_rng(config.seed + i).normal(
            0.0, np.sqrt(t_exact / h), size=(config.chains, 2)
        )
        # Per-coordinate rates eta_i = lr * P_i with lr = 1 and the fixed preconditioner P = lrs.
        res = simulate_sgd(
            problem,
            1.0,
            1,
            config.steps,
            config.chains,
            init=init,
            preconditioner=lrs,
            seed=config.seed + 10 + i,
            observables=estimate_temperatures.observables(problem),
        )
        temp, temp_se = estimate_temperatures(res)
        ratio, ratio_se = ratio_stderr(temp[0], temp_se[0], temp[1], temp_se[1])
        rows[name] = {
            "lrs": lrs,
            "T": temp,
            "T_se": temp_se,
            "T_exact": t_exact,
            "T_langevin": coordinate_temperatures(h, s**2, lrs, exact=False),
            "ratio": ratio,
            "ratio_se": ratio_se,
            "ratio_exact": float(t_exact[0] / t_exact[1]),
        }
    return {"schemes": rows, "noise_std": s, "curvatures": h}


_LABEL = {
    "plain": "eta_i = eta",
    "inverse_variance": "eta_i = eta'/sigma_i^2",
    "inverse_std": "eta_i = eta'/sigma_i (RMSProp)",
}


def claims(results: dict[str, Any]) -> list[Claim]:
    out = []
    s = results["noise_std"]
    for name, r in results["schemes"].items():
        for i, coord in enumerate("xy"):
            out.append(
                Claim(
                    f"two_temperatures.{name}_T{coord}",
                    f"{_LABEL[name]}: temperature of {coord} (exact discrete law)",
                    "T_i = eta_i sigma_i^2/(2 - eta_i h_i)",
                    r["T_exact"][i],
                    r["T"][i],
                    r["T_se"][i],
                    tolerance(r["T_se"][i]),
                )
            )
        langevin_ratio = r["T_langevin"][0] / r["T_langevin"][1]
        formula = {
            "plain": "T_x/T_y = sigma_x^2/sigma_y^2",
            "inverse_variance": "T_x/T_y = 1 (Gibbs)",
            "inverse_std": "T_x/T_y = sigma_x/sigma_y",
        }[name]
        out.append(
            Claim(
                f"two_temperatures.{name}_ratio",
                f"{_LABEL[name]}: ratio of temperatures (Langevin value {langevin_ratio:.3g})",
                formula,
                r["ratio_exact"],
                r["ratio"],
                r["ratio_se"],
                tolerance(r["ratio_se"]),
                note=f"sigma = ({s[0]:g}, {s[1]:g})",
            )
        )
    return out


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure()
    a = ax[0, 0]
    names = list(results["schemes"])
    xs = np.arange(len(names))
    for i, coord in enumerate("xy"):
        r = [results["schemes"][n] for n in names]
        a.errorbar(
            xs + (i - 0.5) * 0.15,
            [q["T"][i] for q in r],
            [2 * q["T_se"][i] for q in r],
            fmt="o",
            label=f"measured T_{coord}",
        )
        a.plot(xs + (i - 0.5) * 0.15, [q["T_exact"][i] for q in r], "_", ms=18, color="k")
    a.set_xticks(xs, [_LABEL[n] for n in names], fontsize=7)
    a.set(ylabel="temperature", yscale="log", title="per-coordinate temperatures (bars: exact)")
    a.legend(fontsize=8)
    return [save(fig, outdir, "temperatures.png")]
