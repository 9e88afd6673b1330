"""Experiment 4: momentum, its three forms, and the conjugacy of (eta', N_g).

The lecture's forms of heavy-ball momentum with beta = 1 - 1/N_g:

(a) v = beta v + eta g_hat, Phi -= v;      (b) mu = beta mu + (1/N_g) g_hat, Phi -= N_g eta mu;
(c) torch.optim.SGD(lr=eta, momentum=beta) (and sgdlab.SGD with the same arguments);

coincide (identical in float64 up to rounding). On a 1-D quadratic with curvature h and additive
noise of variance s^2 = sigma^2/B, the stationary variance of heavy-ball momentum is exactly

    Var = (1 + beta) eta s^2 / ((1 - beta) h (2 (1 + beta) - eta h)).

With eta = eta'/N_g (the lecture's conjugate learning rate) this equals eta' s^2/(2h) to first
order for every N_g (flat in N_g), while at fixed per-step eta it grows like N_g: eta' and N_g
are (nearly) conjugate, eta and N_g are not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...optim import SGD as SgdlabSGD
from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from ._common import chain_mean, ratio_stderr, with_curves

NAME = "momentum"
TITLE = "4. Momentum: three forms coincide; stationary variance at fixed eta' versus fixed eta"
DESCRIPTION = (
    "First, the lecture's two ways of writing momentum and torch.optim.SGD (and sgdlab.SGD) are "
    "run on the same noisy quadratic with the same noise and compared in float64: the largest "
    "difference between trajectories is at rounding level. Second, many chains of heavy-ball "
    "SGD on a 1-D quadratic with additive noise measure the stationary variance across N_g, "
    "once at fixed eta' = eta N_g and once at fixed eta. The closed form (a discrete Lyapunov "
    "equation) predicts a variance nearly flat in N_g at fixed eta' and growing like N_g at "
    "fixed eta: the measured points sit on it."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {"n_g": Range(ge=1), "chains": Range(ge=2)}

    n_g: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0)
    eta_prime: float = 0.1
    eta_fixed: float = 0.01
    h: float = 1.0
    sigma: float = 1.0
    chains: int = 2000
    average_steps: int = 4000
    identity_steps: int = 300
    identity_dim: int = 6


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"chains": 1000, "average_steps": 1500, "n_g": (1.0, 5.0, 10.0)},
    "full": {"chains": 10000, "average_steps": 20000, "n_g": (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)},
}


def heavy_ball_variance(eta: float, beta: float, h: float, s2: float) -> float:
    """Exact stationary variance of heavy-ball SGD on a 1-D quadratic (additive noise s2)."""
    return (1 + beta) * eta * s2 / ((1 - beta) * h * (2 * (1 + beta) - eta * h))


def _forms(config: Config) -> dict[str, float]:
    """Max |difference| between the trajectories of the momentum forms (float64)."""
    gen = torch.Generator().manual_seed(config.seed)
    d, n_g, eta = config.identity_dim, 10.0, 0.01
    beta = 1 - 1 / n_g
    h = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    noise = torch.randn(config.identity_steps, d, generator=gen, dtype=torch.float64)
    x0 = torch.ones(d, dtype=torch.float64)

    def grad(x: torch.Tensor, t: int) -> torch.Tensor:
        return h * x + noise[t]

    xa, v = x0.clone(), torch.zeros(d, dtype=torch.float64)
    xb, mu = x0.clone(), torch.zeros(d, dtype=torch.float64)
    pc = torch.nn.Parameter(x0.clone())
    ps = torch.nn.Parameter(x0.clone())
    opt_c = torch.optim.SGD([pc], lr=eta, momentum=beta)
    opt_s = SgdlabSGD([ps], lr=eta, momentum=beta)
    dev = {"ema_form": 0.0, "torch": 0.0, "sgdlab": 0.0}
    for t in range(config.identity_steps):
        g = grad(xa, t)
        v = beta * v + eta * g
        xa = xa - v
        mu = beta * mu + (1 / n_g) * grad(xb, t)
        xb = xb - n_g * eta * mu
        for p, opt in ((pc, opt_c), (ps, opt_s)):
            p.grad = grad(p.detach(), t)
            opt.step()
        scale = float(xa.abs().max())
        dev["ema_form"] = max(dev["ema_form"], float((xb - xa).abs().max()) / scale)
        dev["torch"] = max(dev["torch"], float((pc.detach() - xa).abs().max()) / scale)
        dev["sgdlab"] = max(dev["sgdlab"], float((ps.detach() - xa).abs().max()) / scale)
    return dev


def _stationary_var(
    eta: float, beta: float, config: Config, rng: np.random.Generator
) -> tuple[float, float]:
    """Time-averaged x^2 per chain from the exact stationary covariance; mean and s.e."""
    h, s2, r = config.h, config.sigma**2, config.chains
    # Exact stationary covariance of (x_t, x_{t-1}) to start in the stationary law.
    a = np.array([[1 + beta - eta * h, -beta], [1.0, 0.0]])
    q = np.array([[eta**2 * s2, 0.0], [0.0, 0.0]])
    from scipy.linalg import solve_discrete_lyapunov

    cov = solve_discrete_lyapunov(a, q)
    z = rng.multivariate_normal(np.zeros(2), cov, size=r)
    x, x_prev = z[:, 0].copy(), z[:, 1].copy()
    acc = np.zeros(r)
    for _ in range(config.average_steps):
        g = h * x + np.sqrt(s2) * rng.standard_normal(r)
        x, x_prev = x + beta * (x - x_prev) - eta * g, x
        acc += x * x
    return chain_mean(acc / config.average_steps)


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(config.seed)
    rows = []
    for n_g in bar(config.n_g, desc=NAME):
        beta = 1 - 1 / n_g
        for mode, eta in (
            ("fixed_eta_prime", config.eta_prime / n_g),
            ("fixed_eta", config.eta_fixed),
        ):
            v, se = _stationary_var(eta, beta, config, rng)
            rows.append(
                {
                    "n_g": n_g,
                    "mode": mode,
                    "eta": eta,
                    "beta": beta,
                    "var": v,
                    "var_se": se,
                    "var_exact": heavy_ball_variance(eta, beta, config.h, config.sigma**2),
                }
            )
    return {
        "forms": _forms(config),
        "rows": rows,
        "eta_prime": config.eta_prime,
        "eta_fixed": config.eta_fixed,
        "h": config.h,
        "sigma2": config.sigma**2,
        "reference_values": {
            "beta0.9_eta0.01": heavy_ball_variance(0.01, 0.9, 1, 1),
            "beta0.5_eta0.5": heavy_ball_variance(0.5, 0.5, 1, 1),
        },
    }


def claims(results: dict[str, Any]) -> list[Claim]:
    out = []
    for form, dev in results["forms"].items():
        out.append(
            Claim(
                f"momentum.form_{form}",
                f"the momentum forms coincide: v-form vs {form.replace('_', ' ')} (float64)",
                "max_t |Phi_a - Phi_b| / |Phi| = 0",
                0.0,
                dev,
                0.0,
                1e-12,
            )
        )
    ref = results["reference_values"]
    out.append(
        Claim(
            "momentum.reference_values",
            "closed form reproduces REFERENCE.md: beta=.9, eta=.01 -> 0.050132",
            "Var(beta, eta) at h = s = 1",
            0.050132,
            ref["beta0.9_eta0.01"],
            0.0,
            5e-7,
        )
    )
    for r in results["rows"]:
        out.append(
            Claim(
                f"momentum.var_{r['mode']}_Ng{r['n_g']:g}",
                f"stationary variance, N_g={r['n_g']:g}, {r['mode'].replace('_', ' ')}",
                "(1+b) eta s^2/((1-b) h (2(1+b) - eta h))",
                r["var_exact"],
                r["var"],
                r["var_se"],
                tolerance(r["var_se"]),
            )
        )
    for mode in ("fixed_eta_prime", "fixed_eta"):
        rows = [r for r in results["rows"] if r["mode"] == mode]
        lo, hi = rows[0], rows[-1]
        ratio, se = ratio_stderr(hi["var"], hi["var_se"], lo["var"], lo["var_se"])
        pred = hi["var_exact"] / lo["var_exact"]
        if mode == "fixed_eta_prime":
            out.append(
                Claim(
                    "momentum.conjugacy_flat",
                    f"at fixed eta' the variance barely moves from N_g={lo['n_g']:g} to "
                    f"{hi['n_g']:g} (conjugacy)",
                    "Var(N_g)/Var(1) = 1 + O(eta')",
                    pred,
                    ratio,
                    se,
                    tolerance(se),
                )
            )
        else:
            out.append(
                Claim(
                    "momentum.fixed_eta_moves",
                    f"at fixed eta the variance grows ~N_g from N_g={lo['n_g']:g} to {hi['n_g']:g}",
                    "Var(N_g)/Var(1) ~ N_g",
                    pred,
                    ratio,
                    se,
                    tolerance(se),
                )
            )
    return out


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure()
    a = ax[0, 0]
    for mode, mk in (("fixed_eta_prime", "o"), ("fixed_eta", "s")):
        rows = [r for r in results["rows"] if r["mode"] == mode]
        ng = [r["n_g"] for r in rows]
        line = a.plot(ng, [r["var_exact"] for r in rows], "-", label=f"exact, {mode}")[0]
        a.errorbar(
            ng,
            [r["var"] for r in rows],
            [2 * r["var_se"] for r in rows],
            fmt=mk,
            color=line.get_color(),
            label=f"measured, {mode}",
        )
    a.set(
        xscale="log",
        yscale="log",
        xlabel="N_g",
        ylabel="stationary Var",
        title=f"eta' = {results['eta_prime']:g} vs eta = {results['eta_fixed']:g}",
    )
    a.legend(fontsize=8)
    return [save(fig, outdir, "momentum_variance.png")]
