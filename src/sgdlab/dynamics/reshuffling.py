"""Exact stationary excess loss of random reshuffling on a quadratic with finite data.

Data: n per-example gradients at the optimum ``z_1..z_n`` with ``sum z_i = 0`` and
``C = (1/n) sum z_i z_i^T``; per-example gradient ``H e + z_i``. Each epoch draws a uniform
permutation pi and takes ``M = n // B`` batches of B consecutive positions (mean reduction).

Within an epoch, after m steps, ``e_m = A^m e_0 - sum_k W_k z_{pi(k)}`` with ``A = I - eta H``
and a matrix weight ``W_k`` per position k. For a uniform permutation,
``E z_pi(k) z_pi(l)^T = C`` if k = l and ``-C/(n-1)`` otherwise, so

    Cov(sum_k W_k z_pi(k)) = P - (Sigma C Sigma^T - P) / (n - 1),
    P = sum_k W_k C W_k^T,  Sigma = sum_k W_k,

with the recursions ``P_{m+1} = A P_m A^T + (eta^2/B) C``, ``Sigma_{m+1} = A Sigma_m + eta I``.
The epoch-boundary covariance solves ``S_0 = A^M S_0 A^M^T + Cov_M`` (independent
permutations across epochs) and ``E e_m e_m^T = A^m S_0 A^m^T + Cov_m``. The excess loss is
the time average over the M positions of an epoch of ``tr(H E e_m e_m^T)/2``.

n = 50, h = sigma = B = 1, eta = 0.01: 0.00038035 (with replacement 0.00251256); the slope of
the excess loss at eta = 0 is 0 (Gurbuzbalaban, Ozdaglar & Parrilo 2021; Safran & Shamir 2020).

Example::

    >>> from sgdlab.dynamics import reshuffling_excess_loss
    >>> round(reshuffling_excess_loss(1.0, 1.0, lr=0.01, n=50), 8)
    0.00038035
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validation import check_batch_size, check_count, check_nonnegative
from ._common import as_matrix

__all__ = ["reshuffling_covariances", "reshuffling_excess_loss"]


def reshuffling_covariances(
    hessian: Any, noise_covariance: Any, lr: float, n: int, batch_size: int = 1
) -> np.ndarray:
    """``E e_m e_m^T`` for ``m = 0..M-1`` within an epoch at stationarity: ``(M, d, d)``."""
    from scipy.linalg import solve_discrete_lyapunov

    H = as_matrix("hessian", hessian, psd=True)
    d = H.shape[0]
    C = as_matrix("noise_covariance", noise_covariance, d, psd=True)
    eta = check_nonnegative("lr", lr)
    n, B = check_count("n", n), check_batch_size("batch_size", batch_size)
    if n < 2 or B > n:
        raise ValueError(f"need n >= 2 and batch_size <= n, got n={n}, batch_size={B}")
    w = np.linalg.eigvalsh(H)
    if w.min() <= 0 or eta * w.max() >= 2:
        raise ValueError(
            f"need H positive definite and eta h_max < 2, got eigenvalues {w}, lr={eta}"
        )
    M = n // B
    if eta == 0.0:  # no step: the limit of the covariances, O(eta) (the system is singular)
        return np.zeros((M, d, d))
    I = np.eye(d)
    A = I - eta * H
    P = np.zeros((d, d))
    Sig = np.zeros((d, d))
    Am = I.copy()
    covs, powers = [], []
    for _ in range(M + 1):
        covs.append(P - (Sig @ C @ Sig.T - P) / (n - 1))
        powers.append(Am.copy())
        P = A @ P @ A.T + (eta**2 / B) * C
        Sig = A @ Sig + eta * I
        Am = A @ Am
    S0 = solve_discrete_lyapunov(powers[M], covs[M])
    out = np.stack([powers[m] @ S0 @ powers[m].T + covs[m] for m in range(M)])
    return 0.5 * (out + np.swapaxes(out, 1, 2))


def reshuffling_excess_loss(
    hessian: Any, noise_covariance: Any, lr: float, n: int, batch_size: int = 1
) -> float:
    """Exact time-averaged stationary excess loss of SGD with random reshuffling (quadratic)."""
    H = as_matrix("hessian", hessian, psd=True)
    covs = reshuffling_covariances(H, noise_covariance, lr, n, batch_size)
    return 0.5 * float(np.mean(np.einsum("ij,mji->m", H, covs)))
