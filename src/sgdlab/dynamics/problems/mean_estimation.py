"""The lecture's one-dimensional example on a finite data set: ``l(beta, y) = (beta - y)^2 / 2``.

With data ``y_1..y_n`` (vectors allowed) ``L(beta) = (1/n) sum_i ||beta - y_i||^2 / 2``,
``g = beta - ybar`` and per-example gradients ``beta - y_i``. So ``H = I``, ``beta* = ybar``,
``C = (1/n) sum_i (y_i - ybar)(y_i - ybar)^T`` and ``L* = tr C / 2``. At ``beta*`` the batch
gradient has mean 0 and variance ``sigma^2/B`` with replacement and
``(sigma^2/B)(n - B)/(n - 1)`` without (one reshuffled epoch).

Example::

    >>> from sgdlab.dynamics import MeanEstimation
    >>> p = MeanEstimation.standardized(n=50, sigma=1.0, seed=0)
    >>> round(float(p.noise_covariance[0, 0]), 12), p.n
    (1.0, 50)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..._validation import check_count, check_positive
from .base import Problem

__all__ = ["MeanEstimation"]


class MeanEstimation(Problem):
    """Per-example loss ``||beta - y_i||^2 / 2`` over the data ``y``, ``(n,)`` or ``(n, d)``."""

    def __init__(self, y: Any) -> None:
        Y = np.asarray(y, dtype=np.float64)
        if Y.ndim == 1:
            Y = Y[:, None]
        if Y.ndim != 2 or Y.shape[0] < 2:
            raise ValueError(f"y must be an (n,) or (n, d) array with n >= 2, got shape {Y.shape}")
        if not np.all(np.isfinite(Y)):
            raise ValueError("y must be finite")
        self.n, self.dim = Y.shape
        self.data = Y
        ybar = Y.mean(axis=0)
        Z = Y - ybar
        self.optimum = ybar
        self.hessian = np.eye(self.dim)
        self.noise_covariance = Z.T @ Z / self.n
        self.min_loss = 0.5 * float(np.trace(self.noise_covariance))
        self._y = torch.as_tensor(Y)
        self._ybar = torch.as_tensor(ybar)

    @classmethod
    def standardized(
        cls, n: int, sigma: float = 1.0, dim: int = 1, seed: int = 0
    ) -> MeanEstimation:
        """Gaussian data made exactly mean 0 and population covariance ``sigma^2 I``."""
        n = check_count("n", n)
        dim = check_count("dim", dim)
        sigma = check_positive("sigma", sigma)
        if n <= dim:
            raise ValueError(f"n must exceed dim to whiten the data, got n={n}, dim={dim}")
        rng = np.random.default_rng(seed)
        Z = rng.standard_normal((n, dim))
        Z -= Z.mean(axis=0)
        cov = Z.T @ Z / n
        L = np.linalg.cholesky(cov)
        Z = np.linalg.solve(L, Z.T).T * sigma
        return cls(Z)

    def loss(self, phi: torch.Tensor) -> torch.Tensor:
        e = phi - self._ybar.to(phi.dtype)
        return 0.5 * (e * e).sum(-1) + self.min_loss

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        return phi - self._ybar.to(phi.dtype)

    def hessian_vector_product(self, phi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v.clone()

    def affine_gradient(
        self, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.eye(self.dim, dtype=dtype), -self._ybar.to(dtype)

    def example_grads(self, phi: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return phi.unsqueeze(1) - self._y.to(phi.dtype)[indices]

    def gradient_covariance(self, phi: torch.Tensor) -> torch.Tensor:
        C = torch.as_tensor(self.noise_covariance, dtype=phi.dtype)
        return C.expand(phi.shape[0], self.dim, self.dim)
