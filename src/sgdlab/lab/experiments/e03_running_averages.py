"""Experiment 3: running averages and bias correction against their closed forms.

On i.i.d. samples x_t ~ N(mu, sigma^2), the recursion mu_t = (1 - w_t) mu_{t-1} + w_t x_t from
mu_0 = 0 with weight 1/N (EMA), 1/min(N, t) (the lecture's correction), Adam's EMA/(1 - beta^t)
and 1/t (exact mean), run by :class:`sgdlab.averages.RunningAverage` on many independent
sequences. Closed forms (:mod:`sgdlab.averages.closed_forms`): E mu_t = (1 - beta^t) mu for the
EMA; 1/min(N,t) is the exact mean (variance sigma^2/t) while t <= N; Adam's estimate has variance
sigma^2 (1-beta)(1+beta^t)/((1+beta)(1-beta^t)) (N = t = 20: 0.054298 sigma^2); the stationary EMA
variance is sigma^2/(2N-1) and its lag N-1 (a (2N-1)-window, REFERENCE.md erratum 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...averages import RunningAverage, ema_mean_lag, mean_factor, variance
from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from ._common import chain_mean, with_curves

NAME = "running_averages"
TITLE = "3. Running averages and bias correction: EMA, 1/min(N,t), Adam's"
DESCRIPTION = (
    "Four running averages of the same i.i.d. Gaussian stream, over many independent sequences: "
    "the plain EMA (weight 1/N, biased towards 0 early), the lecture's 1/min(N,t) (the exact "
    "mean while t <= N, then an EMA), Adam's EMA/(1-beta^t), and the exact mean 1/t. Their "
    "means and variances are compared with the closed forms at every step. The EMA's stationary "
    "variance sigma^2/(2N-1) and lag N-1 are those of a (2N-1)-window, not of the N-window the "
    "slide suggests, and the slide's sum of (1-1/N)^(-n) diverges: the exponent is +n."
)

KINDS = ("ema", "lecture", "adam", "mean")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {"chains": Range(ge=2), "mu": Range()}

    horizon: int = 20
    steps: int = 200
    chains: int = 20000
    mu: float = 1.0
    sigma: float = 1.0


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"chains": 4000, "steps": 120},
    "full": {"chains": 200000, "steps": 400},
}


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(config.seed)
    n, t_max = config.horizon, config.steps
    avgs = {k: RunningAverage(k, None if k == "mean" else float(n)) for k in KINDS}
    traces: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for t in bar(range(1, t_max + 1), desc=NAME):
        x = config.mu + config.sigma * torch.randn(
            config.chains, generator=gen, dtype=torch.float64
        )
        for k in KINDS:
            est = avgs[k].update(x).numpy()
            m, m_se = chain_mean(est)
            mf = mean_factor(k, t, None if k == "mean" else n) * config.mu
            v, v_se = chain_mean((est - mf) ** 2)
            traces[k].append(
                {
                    "t": t,
                    "mean": m,
                    "mean_se": m_se,
                    "mean_pred": mf,
                    "var": v,
                    "var_se": v_se,
                    "var_pred": variance(k, t, None if k == "mean" else n, config.sigma**2),
                }
            )
    # The EMA of a ramp x_t = t lags it by exactly N - 1 once the start-up transient has died.
    ema = RunningAverage("ema", float(n))
    for t in range(1, 40 * n + 1):
        lagged = ema.update(torch.tensor(float(t), dtype=torch.float64)).item()
    lag = 40 * n - lagged
    beta = 1 - 1 / n
    weight_sum = float(sum(beta**k for k in range(40 * n)))
    return {
        "horizon": n,
        "sigma2": config.sigma**2,
        "mu": config.mu,
        "traces": traces,
        "ramp_lag": lag,
        "ramp_lag_pred": ema_mean_lag(float(n)),
        "weight_sum_terms": 40 * n,
        "weight_sum": weight_sum,
    }


def _at(trace: list[dict[str, float]], t: int) -> dict[str, float]:
    return next(r for r in trace if r["t"] == t)


def claims(results: dict[str, Any]) -> list[Claim]:
    n, tr, s2 = results["horizon"], results["traces"], results["sigma2"]
    t_half = max(1, n // 2)
    last = tr["ema"][-1]
    lec = _at(tr["lecture"], t_half)
    adam = _at(tr["adam"], n)
    ema1 = _at(tr["ema"], 1)
    lecn = _at(tr["lecture"], n)
    return [
        Claim(
            "running_averages.ema_bias_t1",
            "the EMA starts biased: E mu_1 = mu/N",
            "E mu_1 = mu/N",
            ema1["mean_pred"],
            ema1["mean"],
            ema1["mean_se"],
            tolerance(ema1["mean_se"]),
        ),
        Claim(
            "running_averages.lecture_exact_mean",
            f"1/min(N,t) weights give the exact mean for t <= N (t={t_half}): variance sigma^2/t",
            "sigma^2/t",
            lec["var_pred"],
            lec["var"],
            lec["var_se"],
            tolerance(lec["var_se"]),
        ),
        Claim(
            "running_averages.lecture_unbiased",
            f"1/min(N,t) is unbiased at t=N={n}",
            "E mu_t = mu",
            results["mu"],
            lecn["mean"],
            lecn["mean_se"],
            tolerance(lecn["mean_se"]),
        ),
        Claim(
            "running_averages.adam_variance",
            f"Adam's m/(1-beta^t) at N=t={n}: variance sigma^2(1-b)(1+b^t)/((1+b)(1-b^t))",
            "sigma^2 (1-beta)(1+beta^t)/((1+beta)(1-beta^t))",
            adam["var_pred"],
            adam["var"],
            adam["var_se"],
            tolerance(adam["var_se"]),
        ),
        Claim(
            "running_averages.ema_variance",
            f"stationary EMA variance (t={last['t']}) is sigma^2/(2N-1): a (2N-1)-window",
            "sigma^2/(2N-1)",
            s2 / (2 * n - 1),
            last["var"],
            last["var_se"],
            tolerance(last["var_se"]),
            erratum=4,
            lecture_formula="N-window: sigma^2/N",
            lecture_value=s2 / n,
        ),
        Claim(
            "running_averages.ema_lag",
            "the EMA of a ramp lags by N-1 steps (not N/2)",
            "lag = N - 1",
            results["ramp_lag_pred"],
            results["ramp_lag"],
            0.0,
            1e-9 * n,
            erratum=4,
            lecture_formula="N-window lag (N-1)/2",
            lecture_value=(n - 1) / 2,
        ),
        Claim(
            "running_averages.weight_sum",
            "sum_{n>=0} (1-1/N)^n = N (the slide's exponent -n diverges)",
            f"sum of first {results['weight_sum_terms']} terms -> N",
            float(n),
            results["weight_sum"],
            0.0,
            n * (1 - 1 / n) ** results["weight_sum_terms"] + 1e-9,
            erratum=4,
            lecture_formula="sum_n (1-1/N)^(-n) = N",
            lecture_value=float("inf"),
        ),
    ]


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure(2, 1)
    for k, tr in results["traces"].items():
        t = np.array([r["t"] for r in tr])
        line = ax[0, 0].plot(t, [r["mean_pred"] for r in tr], "-", label=k)[0]
        ax[0, 0].plot(t[::5], [r["mean"] for r in tr][::5], "o", ms=3, color=line.get_color())
        ax[0, 1].plot(t, [r["var_pred"] for r in tr], "-", color=line.get_color(), label=k)
        ax[0, 1].plot(t[::5], [r["var"] for r in tr][::5], "o", ms=3, color=line.get_color())
    n, s2 = results["horizon"], results["sigma2"]
    ax[0, 1].axhline(s2 / (2 * n - 1), ls=":", color="k", label="sigma^2/(2N-1)")
    ax[0, 1].axhline(s2 / n, ls="--", color="grey", label="sigma^2/N (slide)")
    ax[0, 0].set(xlabel="t", ylabel="E mu_t", title="mean: closed form (lines), measured (dots)")
    ax[0, 1].set(xlabel="t", ylabel="Var mu_t", yscale="log", title="variance")
    ax[0, 0].legend(fontsize=8)
    ax[0, 1].legend(fontsize=7)
    return [save(fig, outdir, "averages.png")]
