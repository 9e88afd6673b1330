"""Closed-form references from the lecture's errata table (1-D and diagonal problems).

Notation: h curvature, sigma^2 per-example gradient variance, B batch size, eta per-step
learning rate. All assume sampling with replacement unless stated.

Example::

    >>> from sgdlab.dynamics import heavy_ball_variance, least_squares_excess_loss
    >>> round(heavy_ball_variance(1.0, 0.01, 0.9), 6)
    0.050132
    >>> round(least_squares_excess_loss([1, .5, .25, .1, .05], 0.5, lr=0.05, batch_size=1), 6)
    0.012945
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validation import (
    check_batch_size,
    check_count,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)
from ._common import as_vector

__all__ = [
    "batch_gradient_variance",
    "coordinate_temperatures",
    "heavy_ball_variance",
    "least_squares_excess_loss",
    "lr_drop_second_moment",
    "quadratic_excess_loss",
    "quadratic_variance",
]


def _stable(h: np.ndarray, eta: np.ndarray | float, what: str = "lr") -> None:
    if np.any(np.asarray(eta) * h >= 2.0):
        raise ValueError(f"{what}={eta} is unstable: eta * h must be < 2 (h = {h})")


def quadratic_variance(h: float, lr: float, sigma2: float = 1.0, batch_size: int = 1) -> float:
    """Stationary variance ``eta sigma^2 / (B h (2 - eta h))`` of SGD on a 1-D quadratic."""
    h, eta = check_positive("h", h), check_nonnegative("lr", lr)
    s2, B = check_nonnegative("sigma2", sigma2), check_batch_size("batch_size", batch_size)
    _stable(np.asarray(h), eta)
    return eta * s2 / (B * h * (2.0 - eta * h))


def quadratic_excess_loss(h: float, lr: float, sigma2: float = 1.0, batch_size: int = 1) -> float:
    """Stationary excess loss ``eta sigma^2 / (2B (2 - eta h))``.

    h = sigma = B = 1: eta = .01 -> 0.0025126, .1 -> 0.0263158, .5 -> 1/6, 1 -> 0.5.
    """
    return 0.5 * h * quadratic_variance(h, lr, sigma2, batch_size)


def heavy_ball_variance(
    h: float, lr: float, beta: float, sigma2: float = 1.0, batch_size: int = 1
) -> float:
    """Heavy-ball (AR(2)) stationary variance on a 1-D quadratic:
    ``(1+beta) eta s^2 / ((1-beta) h (2(1+beta) - eta h))``, ``s^2 = sigma^2/B``.

    ``v = beta v + eta g_hat; Phi -= v`` (the lecture's momentum with ``beta = 1 - 1/N_g``).
    beta = .9, eta = .01 -> 0.050132; beta = .5, eta = .5 -> 0.6.
    """
    h, eta = check_positive("h", h), check_nonnegative("lr", lr)
    beta = check_unit_interval("beta", beta)
    s2 = check_nonnegative("sigma2", sigma2) / check_batch_size("batch_size", batch_size)
    if eta * h >= 2.0 * (1.0 + beta):
        raise ValueError(f"lr={eta} is unstable with beta={beta}: need eta h < 2 (1 + beta)")
    return (1 + beta) * eta * s2 / ((1 - beta) * h * (2 * (1 + beta) - eta * h))


def least_squares_excess_loss(
    curvatures: Any, noise_variance: float, lr: float, batch_size: int = 1
) -> float:
    """Exact stationary excess loss of SGD on least squares with Gaussian inputs x ~ N(0, diag h):
    ``s^2 A / (2(1 - A))``, ``A = sum_k eta h_k / (B (2 - eta (1 + 1/B) h_k))``.

    Multiplicative noise: the second-moment recursion closes because E[x x^T M x x^T] =
    2 H M H + tr(H M) H for Gaussian x. h = (1, .5, .25, .1, .05), s^2 = .5:
    B = 1, eta = .05 -> 0.012945; B = 4, eta = .4 -> 0.032879.
    """
    h = as_vector("curvatures", curvatures)
    s2 = check_nonnegative("noise_variance", noise_variance)
    eta, B = check_nonnegative("lr", lr), check_batch_size("batch_size", batch_size)
    if np.any(h <= 0):
        raise ValueError(f"curvatures must be > 0, got {h}")
    denom = 2.0 - eta * (1.0 + 1.0 / B) * h
    A = float(np.sum(eta * h / (B * denom))) if np.all(denom > 0) else np.inf
    if not A < 1.0:
        raise ValueError(f"lr={eta} is unstable for least squares with batch {B} (A = {A} >= 1)")
    return s2 * A / (2.0 * (1.0 - A))


def batch_gradient_variance(sigma2: float, batch_size: int, n: int | None = None) -> float:
    """Variance of the batch-mean gradient at the optimum: ``sigma^2/B`` with replacement,
    ``(sigma^2/B)(n - B)/(n - 1)`` without replacement from n points."""
    s2, B = check_nonnegative("sigma2", sigma2), check_batch_size("batch_size", batch_size)
    if n is None:
        return s2 / B
    n = check_count("n", n)
    if n < 2 or B > n:
        raise ValueError(f"need 2 <= n and batch_size <= n, got n={n}, batch_size={B}")
    return s2 / B * (n - B) / (n - 1)


def coordinate_temperatures(
    curvatures: Any, noise_variances: Any, lrs: Any, batch_size: int = 1, exact: bool = True
) -> np.ndarray:
    """Per-coordinate temperatures ``T_i`` of SGD with per-coordinate rates ``eta_i``.

    ``exact=False``: the Langevin value ``eta_i sigma_i^2 / (2B)``. ``exact=True`` (quadratic
    coordinates): ``h_i Var_i = eta_i sigma_i^2 / (B (2 - eta_i h_i))`` from the discrete law.
    ``eta_i = eta'/sigma_i^2`` gives one temperature; ``eta'/sigma_i`` gives ``eta' sigma_i/2``.
    """
    s2 = as_vector("noise_variances", noise_variances)
    d = s2.shape[0]
    h = as_vector("curvatures", curvatures, d)
    eta = as_vector("lrs", lrs, d)
    B = check_batch_size("batch_size", batch_size)
    if np.any(eta < 0) or np.any(s2 < 0):
        raise ValueError("lrs and noise_variances must be >= 0")
    if not exact:
        return eta * s2 / (2.0 * B)
    _stable(h, eta, "lrs")
    return eta * s2 / (B * (2.0 - eta * h))


def lr_drop_second_moment(
    t: Any, h: float, lr_old: float, lr_new: float, sigma2: float = 1.0, batch_size: int = 1
) -> np.ndarray:
    """``E e^2`` t steps after dropping the learning rate from stationarity at ``lr_old``:
    ``V_new + (V_old - V_new)(1 - eta_new h)^(2t)`` (1-D quadratic, additive noise)."""
    v_old = quadratic_variance(h, lr_old, sigma2, batch_size)
    v_new = quadratic_variance(h, lr_new, sigma2, batch_size)
    t = np.asarray(t, dtype=np.float64)
    return v_new + (v_old - v_new) * (1.0 - lr_new * h) ** (2.0 * t)
