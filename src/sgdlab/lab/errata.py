"""The lecture's errata (``docs/lab.md``) and the lab's claims that settle each.

The report prints one row per erratum with the measurement of every claim listed in
``settled_by`` and of every claim whose ``erratum`` field names it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ERRATA", "Erratum"]


@dataclass(frozen=True)
class Erratum:
    number: int
    slide: str
    as_written: str
    correct: str
    settled_by: tuple[str, ...]


ERRATA: tuple[Erratum, ...] = (
    Erratum(
        1,
        "Putting it together",
        "N_g = min(1, N'_g/B)",
        "N_g = max(1, N'_g/B); exact per-example form beta_B = beta_1^B, "
        "N_g(B) = 1/(1-(1-1/N'_g)^B). With min, momentum is off for B <= N'_g and beta < 0 beyond.",
        ("batch_scaling.momentum_exact_rule", "batch_scaling.momentum_min_rule"),
    ),
    Erratum(
        2,
        "1-D Langevin",
        "p ~ exp(-L/(alpha eta sigma^2)), alpha ~ 1/10",
        "alpha = 1/2 exactly: p ~ exp(-2L/(eta sigma^2)), T = eta sigma^2/(2B).",
        ("langevin_1d.alpha", "langevin_1d.ks_gibbs"),
    ),
    Erratum(
        3,
        "Classical convergence theorem",
        "eta_t -> 0, sum eta_t = inf",
        "Robbins-Monro also needs sum eta_t^2 < inf; with sum eta_t < inf SGD stalls short of "
        "the optimum. 'lim_{t->0}' means t -> inf.",
        ("convergence.stall",),
    ),
    Erratum(
        4,
        "Running averages",
        "sum_n (1-1/N)^(-n) = N",
        "exponent +n. EMA variance sigma^2/(2N-1) and lag N-1: a (2N-1)-window, not an N-window.",
        ("running_averages.weight_sum", "running_averages.ema_variance"),
    ),
    Erratum(
        5,
        "Conjugacy",
        "'changing x does effect the gradient for y', d f/dx dy = 0",
        "'does not affect', d^2 f/(dx dy) = 0",
        ("momentum.conjugacy_flat", "conjugacy.best_eta_prime_shift_Ng"),
    ),
    Erratum(
        6,
        "Nice theorem",
        "dL/deta at 0 = (1/4) E_i ||g_i||^2",
        "true for B = 1 with replacement; for batch B the slope is E_i ||g_i||^2/(4B); with random "
        "reshuffling the slope at 0 is 0.",
        ("slope.quadratic_slope", "slope.reshuffle_excess"),
    ),
    Erratum(
        7,
        "SGD as MCMC (ResNet plots)",
        "lr reduced twice by a factor of 2",
        "He et al. divide the lr by 10 at each drop (the lab drops it by 10 and checks the "
        "new level).",
        ("mcmc.lr_drop_level",),
    ),
    Erratum(
        8,
        "RMSProp",
        "sqrt(s + eps)",
        "torch puts eps outside: sqrt(s) + eps; both legitimate, sgdlab lets the user pick.",
        ("rmsprop_power.eps_inside", "rmsprop_power.eps_outside_torch"),
    ),
    Erratum(
        9,
        "Adam (simplified)",
        "Phi_t - ...",
        "Phi_t[i] - ... (per-coordinate update)",
        ("adam_bias.lecture_update",),
    ),
)
