"""Experiment 10: SGD and gradient descent approach gradient flow as eta -> 0.

With "time" t = sum of learning rates = K eta, gradient descent with step eta is a first-order
(Euler) scheme for the flow dPhi/dt = -g(Phi): its error at fixed t is O(eta). The modified flow
-grad(L + eta/4 ||grad L||^2) is matched to second order, O(eta^2). SGD's mean (weak error of a
smooth observable, here the loss) is O(eta), its root-mean-square distance to the flow (strong
error) O(sqrt(eta)): the noise per unit time scales like sqrt(eta). The orders are fitted as
slopes of log error against log eta (:func:`sgdlab.dynamics.flow_errors`,
:func:`sgdlab.dynamics.convergence_order`) on a quadratic and on logistic regression on
sklearn's digits (digits 0-4 against 5-9, L2 penalty), against the flow solved by scipy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ...dynamics import LogisticRegression, Quadratic, flow_errors
from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from ._common import digits, fit_loglog_slope, with_curves

NAME = "gradient_flow"
TITLE = "10. Gradient flow: GD and SGD approach the flow as eta -> 0, with measured orders"
DESCRIPTION = (
    "Error at a fixed time t = K eta against the gradient flow, for a range of learning rates, "
    "on a quadratic and on logistic regression on digits. Gradient descent has error O(eta) "
    "(order 1) and O(eta^2) against the modified flow; SGD's expected loss has weak error "
    "O(eta) and its distance to the flow is O(sqrt eta) (order 1/2): the lecture's 'SGD also "
    "converges to gradient flow' holds, at the rate a diffusion predicts."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {
        "chains": Range(ge=2),
        "logistic_chains": Range(ge=2),
        "l2": Range(ge=0),
    }

    lrs: tuple[float, ...] = (0.08, 0.04, 0.02, 0.01)
    time: float = 2.0
    chains: int = 2000
    logistic_chains: int = 300
    l2: float = 0.05
    logistic_examples: int = 300

    def __post_init__(self) -> None:
        super().__post_init__()
        for lr in self.lrs:
            k = self.time / lr if lr > 0 else 0.0
            if lr <= 0 or abs(k - round(k)) > 1e-9 * k:
                raise ValueError(
                    f"lrs must be > 0 and divide time={self.time} into whole steps; got lr={lr}"
                )


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "lrs": (0.08, 0.04, 0.02),
        "chains": 1500,
        "logistic_chains": 200,
        "logistic_examples": 150,
    },
    "full": {
        "lrs": (0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625),
        "chains": 10000,
        "logistic_chains": 2000,
        "logistic_examples": 1797,
    },
}

KINDS = {
    "gd": ("gradient descent", 1.0, "rms_error"),
    "gd_modified": ("GD vs the modified flow", 2.0, "rms_error"),
    "sgd_weak": ("SGD, weak error of the loss", 1.0, "weak_error"),
    "sgd_strong": ("SGD, RMS distance", 0.5, "rms_error"),
}


def _problems(config: Config) -> dict[str, Any]:
    x, y = digits()
    n = min(config.logistic_examples, x.shape[0])
    rng = np.random.default_rng(config.seed)
    idx = rng.choice(x.shape[0], n, replace=False)
    logistic = LogisticRegression(x[idx], (y[idx] >= 5).astype(float), l2=config.l2)
    quad = Quadratic(hessian=[1.0, 0.3], noise_covariance=[1.0, 2.0])
    return {
        "quadratic": (quad, np.array([2.0, -1.5])),
        "logistic": (logistic, logistic.optimum + 0.5),
    }


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"lrs": list(config.lrs), "problems": {}}
    for name, (problem, init) in bar(_problems(config).items(), desc=NAME):
        chains = config.chains if name == "quadratic" else config.logistic_chains
        runs = {
            "gd": flow_errors(problem, list(config.lrs), config.time, init, stochastic=False),
            "gd_modified": flow_errors(
                problem, list(config.lrs), config.time, init, stochastic=False, modified=True
            ),
            "sgd": flow_errors(
                problem,
                list(config.lrs),
                config.time,
                init,
                stochastic=True,
                chains=chains,
                seed=config.seed,
            ),
        }
        rows = {}
        for kind, (_label, _order, key) in KINDS.items():
            r = runs["sgd" if kind.startswith("sgd") else kind]
            err = r[key]
            order, order_se = fit_loglog_slope(config.lrs, err)
            rows[kind] = {
                "error": err,
                "stderr": r[key.replace("error", "stderr")],
                "order": order,
                "order_se": order_se,
            }
        out["problems"][name] = rows
    return out


def claims(results: dict[str, Any]) -> list[Claim]:
    out = []
    for pname, rows in results["problems"].items():
        for kind, r in rows.items():
            label, pred, _ = KINDS[kind]
            out.append(
                Claim(
                    f"gradient_flow.{pname}_{kind}_order",
                    f"{label} on the {pname} problem: error at fixed "
                    f"t = sum eta is O(eta^{pred:g})",
                    f"d log err / d log eta = {pred:g}",
                    pred,
                    r["order"],
                    r["order_se"],
                    tolerance(r["order_se"], model_error=0.15),
                    exact=False,
                    note="fitted over the eta grid; 0.15 allowed for higher-order terms",
                )
            )
    return out


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    lrs = np.asarray(results["lrs"])
    fig, ax = figure(2, 1)
    for a, (pname, rows) in zip(ax[0], results["problems"].items()):
        for kind, r in rows.items():
            a.errorbar(
                lrs,
                r["error"],
                2 * np.asarray(r["stderr"]),
                fmt="o-",
                ms=4,
                label=f"{KINDS[kind][0]} (order {r['order']:.2f})",
            )
        a.set(xscale="log", yscale="log", xlabel="eta", ylabel="error at t = K eta", title=pname)
        a.legend(fontsize=7)
    return [save(fig, outdir, "flow_orders.png")]
