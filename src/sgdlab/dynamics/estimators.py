"""Estimators with standard errors from independent chains.

Protocol (REFERENCE.md): run R independent chains, time-average each chain, and take the
standard error from the spread of the per-chain averages (time steps are correlated, chains
are not). Compare with an exact reference by ``z = (estimate - reference) / stderr``.

Example::

    >>> import torch
    >>> from sgdlab.dynamics import estimate_mean
    >>> m, se = estimate_mean(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    >>> m, round(se, 6)
    (2.5, 0.645497)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = [
    "estimate_excess_from_fdr",
    "estimate_mean",
    "fit_excess_slope",
    "ks_distance",
    "z_score",
]


def _as_numpy(samples: Any) -> np.ndarray:
    if torch.is_tensor(samples):
        samples = samples.detach().cpu().to(torch.float64).numpy()
    return np.asarray(samples, dtype=np.float64)


def estimate_mean(samples: Any) -> tuple[Any, Any]:
    """Mean over chains (axis 0) and its standard error ``std(ddof=1)/sqrt(R)``.

    ``samples``: per-chain values, shape ``(R,)`` (floats returned) or ``(R, ...)`` (arrays).
    """
    x = _as_numpy(samples)
    if x.ndim == 0 or x.shape[0] < 2:
        raise ValueError(f"samples need >= 2 chains along axis 0, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("samples contain non-finite values")
    m = x.mean(axis=0)
    se = x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])
    if x.ndim == 1:
        return float(m), float(se)
    return m, se


def estimate_excess_from_fdr(grad_sq: Any, lr: float) -> tuple[float, float]:
    """Excess loss from the fluctuation-dissipation relation, ``(eta/4) E ||g_hat||^2``.

    Exact at stationarity for constant-lr SGD on quadratic per-example losses (Yaida 2018;
    the lecture's proof, step 3), whatever H and C; needs only the gradients SGD already
    computes, not L*. ``grad_sq``: per-chain time averages of ``||g_hat||^2``
    (``ChainResult.grad_sq``). Returns ``(estimate, stderr)``.
    """
    from .._validation import check_positive

    eta = check_positive("lr", lr)
    m, se = estimate_mean(grad_sq)
    return 0.25 * eta * m, 0.25 * eta * se


def z_score(estimate: Any, stderr: Any, reference: Any) -> Any:
    """``(estimate - reference) / stderr`` (raises if a standard error is not > 0)."""
    se = np.asarray(stderr, dtype=np.float64)
    if np.any(~(se > 0)):
        raise ValueError(f"stderr must be > 0, got {stderr!r}")
    z = (np.asarray(estimate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)) / se
    return float(z) if z.ndim == 0 else z


def fit_excess_slope(lrs: Any, excess: Any, stderr: Any, degree: int = 2) -> tuple[float, float]:
    """Slope of the converged excess loss ``L(eta) - L*`` at ``eta = 0`` from several eta.

    Weighted least squares of ``excess = a_1 eta + ... + a_degree eta^degree`` (no constant:
    ``L(0) = L*``) with weights ``1/stderr^2``; returns ``(a_1, stderr of a_1)``. The exact
    slope is ``tr C / (4B)`` with replacement (0 with random reshuffling).
    """
    x = _as_numpy(lrs).reshape(-1)
    y = _as_numpy(excess).reshape(-1)
    s = _as_numpy(stderr).reshape(-1)
    if not (x.shape == y.shape == s.shape) or x.size < degree:
        raise ValueError(f"lrs, excess and stderr need the same length >= degree={degree}")
    if np.any(x <= 0) or np.any(s <= 0):
        raise ValueError("lrs and stderr must be > 0")
    X = np.stack([x**k for k in range(1, degree + 1)], axis=1) / s[:, None]
    coef, *_ = np.linalg.lstsq(X, y / s, rcond=None)
    cov = np.linalg.inv(X.T @ X)
    return float(coef[0]), float(np.sqrt(cov[0, 0]))


def ks_distance(samples: Any, cdf: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """Kolmogorov-Smirnov distance ``sup |F_R - F|`` of independent samples to a cdf, with the
    p-value (``scipy.stats.kstest``). Use one sample per chain (chains are independent)."""
    from scipy.stats import kstest

    x = _as_numpy(samples).reshape(-1)
    if x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError("samples need >= 2 finite values")
    res = kstest(x, cdf)
    return float(res.statistic), float(res.pvalue)
