"""Exact stationary covariances of linear SGD dynamics (quadratic loss, additive noise).

Constant-lr SGD on ``L = (1/2) e^T H e`` with per-example gradient covariance C and batch B
(with replacement) is the linear recursion ``e_{t+1} = (I - eta H) e_t - eta xi_t``,
``Cov xi = C/B``. Its stationary covariance solves the discrete Lyapunov equation

    S = (I - eta H) S (I - eta H)^T + eta^2 C / B,

and the excess loss is ``tr(H S)/2``; differentiating at ``eta = 0`` gives the slope
``tr C / (4B)`` for every H (the lecture's "nice theorem", corrected for B). The continuous-time
(Ornstein-Uhlenbeck) model of Mandt, Hoffman & Blei (2017) replaces it with
``H S + S H = eta C / B``, which understates the discrete excess loss by O(eta).
With heavy-ball momentum the state ``(e_t, v_t)`` is again linear (see
:func:`momentum_stationary_covariance`). scipy's ``solve_discrete_lyapunov`` and
``solve_continuous_lyapunov`` do the solving.

Example::

    >>> from sgdlab.dynamics import excess_loss
    >>> round(excess_loss(1.0, 1.0, lr=0.1, batch_size=1), 7)
    0.0263158
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validation import check_batch_size, check_horizon, check_nonnegative
from ._common import as_matrix

__all__ = [
    "excess_loss",
    "excess_loss_slope",
    "momentum_stationary_covariance",
    "ou_covariance",
    "stationary_covariance",
]


def _check_stable(H: np.ndarray, eta: float) -> None:
    w = np.linalg.eigvalsh(H)
    if w.min() <= 0:
        raise ValueError(f"hessian must be positive definite for a stationary law, eigenvalues {w}")
    if eta * w.max() >= 2.0:
        raise ValueError(f"lr={eta} is unstable: eta * h_max = {eta * w.max():.6g} must be < 2")


def stationary_covariance(
    hessian: Any, noise_covariance: Any, lr: float, batch_size: int = 1
) -> np.ndarray:
    """Exact stationary covariance S of constant-lr SGD on a quadratic (discrete Lyapunov).

    ``S = (I - eta H) S (I - eta H)^T + eta^2 C / B``; 1-D: ``eta sigma^2 / (B h (2 - eta h))``.
    """
    from scipy.linalg import solve_discrete_lyapunov

    H = as_matrix("hessian", hessian, psd=True)
    C = as_matrix("noise_covariance", noise_covariance, H.shape[0], psd=True)
    eta = check_nonnegative("lr", lr)
    B = check_batch_size("batch_size", batch_size)
    _check_stable(H, eta)
    if eta == 0.0:  # no step: the limit of S = O(eta) (the Lyapunov system is singular)
        return np.zeros_like(H)
    A = np.eye(H.shape[0]) - eta * H
    S = solve_discrete_lyapunov(A, eta**2 * C / B)
    return 0.5 * (S + S.T)


def excess_loss(hessian: Any, noise_covariance: Any, lr: float, batch_size: int = 1) -> float:
    """Exact stationary excess loss ``E L - L* = tr(H S) / 2`` of constant-lr SGD (quadratic).

    1-D: ``eta sigma^2 / (2B (2 - eta h))``; h = sigma = B = 1, eta = 0.01 -> 0.0025126.
    """
    H = as_matrix("hessian", hessian, psd=True)
    S = stationary_covariance(H, noise_covariance, lr, batch_size)
    return 0.5 * float(np.trace(H @ S))


def excess_loss_slope(noise_covariance: Any, batch_size: int = 1) -> float:
    """``d(E L - L*)/d eta`` at ``eta = 0``: ``tr C / (4B)`` (sampling with replacement)."""
    C = as_matrix("noise_covariance", noise_covariance, psd=True)
    return float(np.trace(C)) / (4.0 * check_batch_size("batch_size", batch_size))


def ou_covariance(
    hessian: Any, noise_covariance: Any, lr: float, batch_size: int = 1
) -> np.ndarray:
    """Stationary covariance of the OU approximation: ``H S + S H = eta C / B``.

    Mandt, Hoffman & Blei (2017), "Stochastic gradient descent as approximate Bayesian
    inference". Equals :func:`stationary_covariance` to first order in eta.
    """
    from scipy.linalg import solve_continuous_lyapunov

    H = as_matrix("hessian", hessian, psd=True)
    C = as_matrix("noise_covariance", noise_covariance, H.shape[0], psd=True)
    eta = check_nonnegative("lr", lr)
    B = check_batch_size("batch_size", batch_size)
    if np.linalg.eigvalsh(H).min() <= 0:
        raise ValueError("hessian must be positive definite for a stationary law")
    S = solve_continuous_lyapunov(H, eta * C / B)
    return 0.5 * (S + S.T)


def momentum_stationary_covariance(
    hessian: Any, noise_covariance: Any, lr: float, momentum_horizon: float, batch_size: int = 1
) -> np.ndarray:
    """Joint stationary covariance of ``(e, mu)`` for lecture-form momentum on a quadratic.

    ``mu' = beta mu + (1 - beta) g_hat``, ``e' = e - N_g eta mu'`` with ``beta = 1 - 1/N_g`` and
    ``g_hat = H e + xi``. Returns the ``2d x 2d`` covariance of ``(e, mu)`` (after a step, i.e.
    the ``mu`` that produced the current ``e``); its top-left block is ``Cov e``. In 1-D
    ``Var e = (1+beta) eta s^2 / ((1-beta) h (2(1+beta) - eta h))``, ``s^2 = sigma^2/B``.
    """
    from scipy.linalg import solve_discrete_lyapunov

    H = as_matrix("hessian", hessian, psd=True)
    d = H.shape[0]
    C = as_matrix("noise_covariance", noise_covariance, d, psd=True)
    eta = check_nonnegative("lr", lr)
    Ng = check_horizon("momentum_horizon", momentum_horizon)
    B = check_batch_size("batch_size", batch_size)
    beta = 1.0 - 1.0 / Ng
    I = np.eye(d)
    # mu' = beta mu + (1-beta)(H e + xi);  e' = e - Ng eta mu'
    M_mu = np.hstack([(1 - beta) * H, beta * I])
    M_e = np.hstack([I, np.zeros((d, d))]) - Ng * eta * M_mu
    A = np.vstack([M_e, M_mu])
    G = np.vstack([-Ng * eta * (1 - beta) * I, (1 - beta) * I])
    rho = np.abs(np.linalg.eigvals(A)).max()
    if rho >= 1.0:
        raise ValueError(f"lr={eta}, momentum_horizon={Ng} is unstable (spectral radius {rho:.6g})")
    S = solve_discrete_lyapunov(A, G @ (C / B) @ G.T)
    return 0.5 * (S + S.T)
