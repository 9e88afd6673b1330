"""Experiment 11: the converged loss L(eta) and the slope theorem.

The lecture's "nice theorem": dL/deta at eta = 0 equals E_i||g_i||^2/4. REFERENCE.md erratum 6:
that holds for B = 1 with i.i.d. sampling; for batch B the slope is tr C/(4B) (C = E_i g_i g_i^T)
and with random reshuffling (a permutation per epoch) it is 0. Its proof's step 3 is exact at
every eta for quadratic per-example losses (Yaida's fluctuation-dissipation relation):
E L - L* = (eta/4) E_stationary ||g_hat||^2.

Measured with :func:`sgdlab.dynamics.simulate_sgd` (chains started in the exact stationary law
where known) on: a quadratic with additive noise (exact: discrete Lyapunov,
:func:`sgdlab.dynamics.excess_loss`); Gaussian least squares (multiplicative noise, exact
closed form); mean estimation over n = 50 points with reshuffled epochs (exact:
:func:`sgdlab.dynamics.reshuffling_excess_loss`); logistic regression on sklearn's digits
(no closed form; slope against tr C/(4B) at the optimum). Slopes are fitted through the origin
with a quadratic term (:func:`sgdlab.dynamics.fit_excess_slope`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...dynamics import (
    GaussianLeastSquares,
    LogisticRegression,
    MeanEstimation,
    Quadratic,
    estimate_mean,
    excess_loss,
    excess_loss_slope,
    fit_excess_slope,
    least_squares_excess_loss,
    reshuffling_excess_loss,
    simulate_sgd,
    stationary_covariance,
)
from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from ._common import digits, with_curves

NAME = "slope"
TITLE = "11. Converged loss L(eta) and the slope theorem (tr C/(4B); 0 with reshuffling)"
DESCRIPTION = (
    "Stationary excess loss of constant-lr SGD against eta, measured over many chains, on a "
    "quadratic, on Gaussian least squares, on mean estimation with reshuffled epochs and on "
    "logistic regression on digits. The fitted slope at eta = 0 is tr C/(4B), a factor B below "
    "the slide's for batches; with reshuffled epochs the excess loss is far smaller and its "
    "slope is 0. The proof's fluctuation-dissipation identity E L - L* = (eta/4) E||g_hat||^2 "
    "holds exactly at every eta for quadratic per-example losses, even with multiplicative "
    "noise (least squares). (a) The quadratic at batch B, (b) mean estimation with and without "
    "replacement, (c) logistic regression; dots are measured (error bars two standard errors "
    "over the chains), lines exact or first-order."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {
        "chains": Range(ge=2),
        "logistic_chains": Range(ge=2),
        "l2": Range(ge=0),
    }

    lrs: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    batch_size: int = 4
    steps: int = 3000
    chains: int = 800
    reshuffle_n: int = 50
    reshuffle_lrs: tuple[float, ...] = (0.01, 0.02, 0.05)
    reshuffle_steps: int = 5000
    logistic_lrs: tuple[float, ...] = (0.005, 0.01, 0.02)
    logistic_examples: int = 200
    logistic_chains: int = 100
    logistic_steps: int = 2000
    l2: float = 0.5


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "lrs": (0.05, 0.1, 0.2),
        "steps": 1500,
        "chains": 500,
        "reshuffle_steps": 2500,
        "reshuffle_lrs": (0.01, 0.02, 0.05),
        "logistic_lrs": (0.005, 0.01, 0.02),
        "logistic_chains": 100,
        "logistic_steps": 1200,
        "logistic_examples": 150,
    },
    "full": {
        "lrs": (0.01, 0.02, 0.05, 0.1, 0.2, 0.4),
        "steps": 20000,
        "chains": 4000,
        "reshuffle_steps": 40000,
        "reshuffle_lrs": (0.005, 0.01, 0.02, 0.05, 0.1),
        "logistic_lrs": (0.0025, 0.005, 0.01, 0.02, 0.04),
        "logistic_chains": 200,
        "logistic_steps": 10000,
        "logistic_examples": 600,
    },
}


def _stationary_init(problem: Any, lr: float, b: int, chains: int, seed: int) -> np.ndarray:
    s = stationary_covariance(problem.hessian, problem.noise_covariance, lr, b)
    rng = np.random.default_rng(seed)
    return problem.optimum + rng.multivariate_normal(np.zeros(problem.dim), s, size=chains)


def _quadratic(config: Config) -> dict[str, Any]:
    p = Quadratic(
        hessian=[1.0, 0.5, 0.2],
        noise_covariance=[[1.0, 0.3, 0.0], [0.3, 0.8, 0.1], [0.0, 0.1, 0.5]],
    )
    rows = []
    for i, lr in enumerate(config.lrs):
        res = simulate_sgd(
            p,
            lr,
            config.batch_size,
            config.steps,
            config.chains,
            init=_stationary_init(p, lr, config.batch_size, config.chains, i),
            seed=config.seed + i,
        )
        ex, ex_se = estimate_mean(res.excess_loss)
        fdr, fdr_se = estimate_mean(res.excess_loss - lr / 4 * res.grad_sq)
        rows.append(
            {
                "lr": lr,
                "excess": ex,
                "excess_se": ex_se,
                "excess_exact": excess_loss(p.hessian, p.noise_covariance, lr, config.batch_size),
                "fdr_gap": fdr,
                "fdr_gap_se": fdr_se,
            }
        )
    slope, slope_se = fit_excess_slope(
        [r["lr"] for r in rows], [r["excess"] for r in rows], [r["excess_se"] for r in rows]
    )
    # The same fit of the exact curve: its departure from tr C/(4B) is the fit's own bias.
    slope_fit_exact, _ = fit_excess_slope(
        [r["lr"] for r in rows], [r["excess_exact"] for r in rows], [r["excess_se"] for r in rows]
    )
    return {
        "rows": rows,
        "slope": slope,
        "slope_se": slope_se,
        "slope_fit_exact": slope_fit_exact,
        "slope_exact": excess_loss_slope(p.noise_covariance, config.batch_size),
        "trace_c": float(np.trace(p.noise_covariance)),
        "B": config.batch_size,
    }


def _least_squares(config: Config) -> dict[str, Any]:
    h, s2 = (1.0, 0.5, 0.25, 0.1, 0.05), 0.5
    p = GaussianLeastSquares(h, s2)
    out = []
    for i, (b, lr) in enumerate(((1, 0.05), (4, 0.4))):
        res = simulate_sgd(
            p,
            lr,
            b,
            config.steps,
            config.chains,
            burn_in=config.steps // 2,
            seed=config.seed + 100 + i,
        )
        ex, ex_se = estimate_mean(res.excess_loss)
        fdr, fdr_se = estimate_mean(res.excess_loss - lr / 4 * res.grad_sq)
        out.append(
            {
                "B": b,
                "lr": lr,
                "excess": ex,
                "excess_se": ex_se,
                "excess_exact": least_squares_excess_loss(h, s2, lr, b),
                "fdr_gap": fdr,
                "fdr_gap_se": fdr_se,
            }
        )
    return {"rows": out}


def _reshuffle(config: Config) -> dict[str, Any]:
    p = MeanEstimation.standardized(config.reshuffle_n, sigma=1.0, seed=config.seed)
    rows = []
    for i, lr in enumerate(config.reshuffle_lrs):
        row = {"lr": lr}
        for sampling in ("reshuffle", "replacement"):
            res = simulate_sgd(
                p,
                lr,
                1,
                config.reshuffle_steps,
                config.chains,
                sampling=sampling,
                burn_in=config.reshuffle_steps // 5,
                seed=config.seed + 200 + i,
            )
            ex, ex_se = estimate_mean(res.excess_loss)
            row[sampling] = ex
            row[sampling + "_se"] = ex_se
        row["reshuffle_exact"] = reshuffling_excess_loss(
            p.hessian, p.noise_covariance, lr, config.reshuffle_n
        )
        row["replacement_exact"] = excess_loss(p.hessian, p.noise_covariance, lr, 1)
        rows.append(row)
    lrs, se = [r["lr"] for r in rows], [r["reshuffle_se"] for r in rows]
    slope, slope_se = fit_excess_slope(lrs, [r["reshuffle"] for r in rows], se)
    # The same fit applied to the exact values: what a zero slope looks like on this eta grid.
    slope_fit_exact, _ = fit_excess_slope(lrs, [r["reshuffle_exact"] for r in rows], se)
    return {
        "rows": rows,
        "slope": slope,
        "slope_se": slope_se,
        "slope_fit_exact": slope_fit_exact,
        "slope_replacement": excess_loss_slope(p.noise_covariance, 1),
        "n": p.n,
    }


def _logistic(config: Config) -> dict[str, Any]:
    x, y = digits()
    rng = np.random.default_rng(config.seed)
    idx = rng.choice(x.shape[0], min(config.logistic_examples, x.shape[0]), replace=False)
    p = LogisticRegression(x[idx], (y[idx] >= 5).astype(float), l2=config.l2)
    rows = []
    for i, lr in enumerate(config.logistic_lrs):
        res = simulate_sgd(
            p,
            lr,
            1,
            config.logistic_steps,
            config.logistic_chains,
            burn_in=config.logistic_steps // 3,
            seed=config.seed + 300 + i,
        )
        ex, ex_se = estimate_mean(res.excess_loss)
        rows.append({"lr": lr, "excess": ex, "excess_se": ex_se})
    slope, slope_se = fit_excess_slope(
        [r["lr"] for r in rows], [r["excess"] for r in rows], [r["excess_se"] for r in rows]
    )
    return {
        "rows": rows,
        "slope": slope,
        "slope_se": slope_se,
        "slope_exact": excess_loss_slope(p.noise_covariance, 1),
    }


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    parts = {
        "quadratic": _quadratic,
        "least_squares": _least_squares,
        "reshuffle": _reshuffle,
        "logistic": _logistic,
    }
    return {name: fn(config) for name, fn in bar(parts.items(), desc=NAME)}


def claims(results: dict[str, Any]) -> list[Claim]:
    q, ls, rr, lg = (results[k] for k in ("quadratic", "least_squares", "reshuffle", "logistic"))
    out = []
    for r in q["rows"]:
        out.append(
            Claim(
                f"slope.quadratic_excess_eta{r['lr']:g}",
                f"quadratic, B={q['B']}, eta={r['lr']:g}: excess loss tr(HS)/2 (discrete Lyapunov)",
                "S = (I - eta H) S (I - eta H) + eta^2 C/B",
                r["excess_exact"],
                r["excess"],
                r["excess_se"],
                tolerance(r["excess_se"]),
            )
        )
    big = q["rows"][-1]
    out.append(
        Claim(
            "slope.fdr_quadratic",
            f"fluctuation-dissipation, exact at eta="
            f"{big['lr']:g}: E L - L* - (eta/4) E||g_hat||^2 = 0",
            "E L - L* = (eta/4) E||g_hat||^2",
            0.0,
            big["fdr_gap"],
            big["fdr_gap_se"],
            tolerance(big["fdr_gap_se"]),
        )
    )
    out.append(
        Claim(
            "slope.quadratic_slope",
            f"slope of L(eta) at 0 for batch B={q['B']}",
            "dL/deta(0) = tr C/(4B)",
            q["slope_exact"],
            q["slope"],
            q["slope_se"],
            tolerance(
                q["slope_se"],
                model_error=abs(q.get("slope_fit_exact", q["slope_exact"]) - q["slope_exact"]),
            ),
            exact=False,
            erratum=6,
            lecture_formula="(1/4) E_i ||g_i||^2",
            lecture_value=q["trace_c"] / 4,
        )
    )
    for r in ls["rows"]:
        out.append(
            Claim(
                f"slope.least_squares_B{r['B']}",
                f"Gaussian least squares, B={r['B']}, eta={r['lr']:g}: exact excess",
                "s^2 A/(2(1-A))",
                r["excess_exact"],
                r["excess"],
                r["excess_se"],
                tolerance(r["excess_se"]),
            )
        )
        out.append(
            Claim(
                f"slope.fdr_least_squares_B{r['B']}",
                f"fluctuation-dissipation with multiplicative noise (B={r['B']}, eta={r['lr']:g})",
                "E L - L* = (eta/4) E||g_hat||^2",
                0.0,
                r["fdr_gap"],
                r["fdr_gap_se"],
                tolerance(r["fdr_gap_se"]),
            )
        )
    for r in rr["rows"]:
        out.append(
            Claim(
                f"slope.reshuffle_eta{r['lr']:g}",
                f"reshuffled epochs, n={rr['n']}, eta={r['lr']:g}: exact excess",
                "epoch-periodic Lyapunov",
                r["reshuffle_exact"],
                r["reshuffle"],
                r["reshuffle_se"],
                tolerance(r["reshuffle_se"]),
            )
        )
    first = rr["rows"][0]
    out.append(
        Claim(
            "slope.reshuffle_excess",
            f"with reshuffling, eta={first['lr']:g}: excess "
            "far below the with-replacement value (slope 0)",
            "exact reshuffled excess",
            first["reshuffle_exact"],
            first["reshuffle"],
            first["reshuffle_se"],
            tolerance(first["reshuffle_se"]),
            erratum=6,
            lecture_formula="eta E||g_i||^2/4 (with replacement)",
            lecture_value=first["replacement_exact"],
        )
    )
    out.append(
        Claim(
            "slope.reshuffle_slope",
            "with reshuffling the slope at eta = 0 is 0 "
            "(fitted on this eta grid, as the same fit of the exact O(eta^2) curve)",
            "dL/deta(0) = 0",
            rr["slope_fit_exact"],
            rr["slope"],
            rr["slope_se"],
            tolerance(rr["slope_se"]),
            exact=False,
            erratum=6,
            lecture_formula="(1/4) E_i ||g_i||^2",
            lecture_value=rr["slope_replacement"],
        )
    )
    out.append(
        Claim(
            "slope.logistic_slope",
            "logistic regression on digits (B=1): fitted slope against E||g_i||^2/4 at the optimum",
            "tr C/(4B)",
            lg["slope_exact"],
            lg["slope"],
            lg["slope_se"],
            tolerance(lg["slope_se"]),
            exact=False,
        )
    )
    return out


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure(3, 1, width=4.2)
    q = results["quadratic"]
    lr = np.array([r["lr"] for r in q["rows"]])
    a = ax[0, 0]
    a.errorbar(
        lr,
        [r["excess"] for r in q["rows"]],
        [2 * r["excess_se"] for r in q["rows"]],
        fmt="o",
        label="measured",
    )
    grid = np.linspace(0, lr.max(), 50)
    a.plot(lr, [r["excess_exact"] for r in q["rows"]], "-", label="exact")
    a.plot(grid, q["slope_exact"] * grid, ":", label="tr C/(4B) eta")
    a.plot(grid, 4 * q["slope_exact"] * grid, "--", label="slide: tr C eta/4")
    a.set(xlabel="eta", ylabel="excess loss", title=f"quadratic, B={q['B']}")
    a.legend(fontsize=7)
    rr = results["reshuffle"]
    lr = np.array([r["lr"] for r in rr["rows"]])
    a = ax[0, 1]
    for k, mk in (("replacement", "s"), ("reshuffle", "o")):
        a.errorbar(
            lr,
            [r[k] for r in rr["rows"]],
            [2 * r[k + "_se"] for r in rr["rows"]],
            fmt=mk,
            label=f"measured, {k}",
        )
        a.plot(lr, [r[k + "_exact"] for r in rr["rows"]], "-", label=f"exact, {k}")
    a.set(
        xlabel="eta",
        ylabel="excess loss",
        xscale="log",
        yscale="log",
        title=f"mean estimation, n={rr['n']}",
    )
    a.legend(fontsize=7)
    lg = results["logistic"]
    lr = np.array([r["lr"] for r in lg["rows"]])
    a = ax[0, 2]
    a.errorbar(
        lr,
        [r["excess"] for r in lg["rows"]],
        [2 * r["excess_se"] for r in lg["rows"]],
        fmt="o",
        label="measured",
    )
    grid = np.linspace(0, lr.max(), 50)
    a.plot(grid, lg["slope_exact"] * grid, ":", label="E||g_i||^2 eta/4")
    a.set(xlabel="eta", ylabel="excess loss", title="logistic regression, digits")
    a.legend(fontsize=7)
    return [save(fig, outdir, "slope.png")]
