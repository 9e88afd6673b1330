"""Experiment 1: the lecture's 1-D example, the batch gradient at the optimum.

Per-example loss l(beta, y) = (beta - y)^2/2 over a fixed training set y_1..y_n (mean
reduction). At beta* = mean(y) the full gradient is 0, but the batch gradient
g_hat = beta* - mean(y over batch) is not: it has mean 0 and variance sigma^2/B when the batch
is drawn with replacement (sigma^2 the population variance of y), and
(sigma^2/B)(n - B)/(n - 1) without replacement (the finite-population correction).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from ._common import chain_mean, with_curves

NAME = "one_d"
TITLE = "1. The 1-D example: the batch gradient at the optimum"
DESCRIPTION = (
    "For l(beta, y) = (beta - y)^2/2 on a fixed data set, the batch gradient at the optimum "
    "beta* = mean(y) is not zero. We draw many batches and measure its mean and variance for "
    "each batch size, with and without replacement. Prediction: mean 0, variance sigma^2/B with "
    "replacement and (sigma^2/B)(n-B)/(n-1) without. Both are exact, so the verdicts test the "
    "sampling code as much as the lecture."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {"n": Range(ge=2), "draws": Range(ge=2)}

    n: int = 64
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    draws: int = 40000

    def __post_init__(self) -> None:
        super().__post_init__()
        if max(self.batch_sizes) > self.n:
            raise ValueError(f"batch_sizes must be <= n={self.n}, got {max(self.batch_sizes)}")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"draws": 8000, "batch_sizes": (1, 4, 16)},
    "full": {"draws": 400000, "batch_sizes": (1, 2, 4, 8, 16, 32, 48, 64)},
}


def _moments(g: np.ndarray) -> dict[str, float]:
    mean, mean_se = chain_mean(g)
    var, var_se = chain_mean(g * g)  # the true mean is 0, so E g^2 is the variance
    return {"mean": mean, "mean_se": mean_se, "var": var, "var_se": var_se}


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(config.seed)
    y = rng.standard_normal(config.n)
    beta_star = y.mean()
    sigma2 = float(((y - beta_star) ** 2).mean())
    rows = []
    for b in bar(config.batch_sizes, desc=NAME):
        if b > config.n:
            raise ValueError(f"batch_sizes must be <= n={config.n}, got {b}")
        idx = rng.integers(0, config.n, size=(config.draws, b))
        with_r = beta_star - y[idx].mean(axis=1)
        perm = np.argsort(rng.random((config.draws, config.n)), axis=1)[:, :b]
        without = beta_star - y[perm].mean(axis=1)
        rows.append(
            {
                "B": b,
                "with": _moments(with_r),
                "without": _moments(without),
                "pred_with": sigma2 / b,
                "pred_without": sigma2 / b * (config.n - b) / (config.n - 1),
            }
        )
    return {"sigma2": sigma2, "n": config.n, "rows": rows}


def claims(results: dict[str, Any]) -> list[Claim]:
    out = []
    for r in results["rows"]:
        b = r["B"]
        w, wo = r["with"], r["without"]
        out.append(
            Claim(
                f"one_d.mean_B{b}",
                f"g_hat at the optimum has mean 0 (B={b}, with replacement)",
                "E g_hat = 0",
                0.0,
                w["mean"],
                w["mean_se"],
                tolerance(w["mean_se"]),
            )
        )
        out.append(
            Claim(
                f"one_d.var_with_B{b}",
                f"Var g_hat = sigma^2/B with replacement (B={b})",
                "sigma^2/B",
                r["pred_with"],
                w["var"],
                w["var_se"],
                tolerance(w["var_se"]),
            )
        )
        if b > 1:
            out.append(
                Claim(
                    f"one_d.var_without_B{b}",
                    f"without replacement the variance shrinks by (n-B)/(n-1) (B={b})",
                    "(sigma^2/B)(n-B)/(n-1)",
                    r["pred_without"],
                    wo["var"],
                    wo["var_se"],
                    tolerance(wo["var_se"], model_error=1e-12 * results["sigma2"]),
                    note="at B = n the batch is the data set: exactly 0 up to rounding"
                    if b == results["n"]
                    else "",
                )
            )
    return out


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    rows = results["rows"]
    bs = np.array([r["B"] for r in rows], float)
    fig, ax = figure()
    a = ax[0, 0]
    a.errorbar(
        bs,
        [r["with"]["var"] for r in rows],
        [2 * r["with"]["var_se"] for r in rows],
        fmt="o",
        label="measured, with replacement",
    )
    a.errorbar(
        bs,
        [r["without"]["var"] for r in rows],
        [2 * r["without"]["var_se"] for r in rows],
        fmt="s",
        label="measured, without replacement",
    )
    a.plot(bs, [r["pred_with"] for r in rows], "-", label="sigma^2/B")
    a.plot(bs, [r["pred_without"] for r in rows], "--", label="(sigma^2/B)(n-B)/(n-1)")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("batch size B")
    a.set_ylabel("Var g_hat at the optimum")
    a.legend(fontsize=8)
    return [save(fig, outdir, "variance.png")]
