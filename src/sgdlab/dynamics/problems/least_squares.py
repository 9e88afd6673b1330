"""Least squares with Gaussian inputs: multiplicative gradient noise (a population problem).

Examples ``x ~ N(0, H)``, ``y = x^T Phi* + eps`` with ``eps ~ N(0, s^2)``, per-example loss
``l = (x^T Phi - y)^2 / 2``. Then ``L = (1/2) e^T H e + s^2/2`` (``e = Phi - Phi*``), the
per-example gradient is ``x (x^T e - eps)`` and its covariance grows with the error:
``Sigma(Phi) = H e e^T H + (e^T H e + s^2) H`` (Isserlis), ``C = s^2 H`` at the optimum.

For diagonal ``H = diag(h_k)``, constant-lr SGD with batch B (with replacement) has the exact
stationary excess loss ``s^2 A / (2 (1 - A))`` with
``A = sum_k eta h_k / (B (2 - eta (1 + 1/B) h_k))`` (:func:`least_squares_excess_loss`).

Example::

    >>> from sgdlab.dynamics import GaussianLeastSquares
    >>> p = GaussianLeastSquares(curvatures=[1.0, 0.5], noise_variance=0.5)
    >>> p.noise_covariance.tolist()
    [[0.5, 0.0], [0.0, 0.25]]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..._validation import check_nonnegative
from .._common import as_matrix, as_vector, psd_sqrt
from .base import Problem

__all__ = ["GaussianLeastSquares"]


class GaussianLeastSquares(Problem):
    """Linear regression, Gaussian inputs with covariance ``curvatures`` (vector = diagonal)."""

    def __init__(self, curvatures: Any, noise_variance: float, optimum: Any = None) -> None:
        H = as_matrix("curvatures", curvatures, psd=True)
        self.dim = H.shape[0]
        self.noise_variance = check_nonnegative("noise_variance", noise_variance)
        self.hessian = H
        self.noise_covariance = self.noise_variance * H
        self.optimum = (
            np.zeros(self.dim) if optimum is None else as_vector("optimum", optimum, self.dim)
        )
        self.min_loss = 0.5 * self.noise_variance
        self._H = torch.as_tensor(H)
        self._H_half = torch.as_tensor(psd_sqrt(H))
        self._opt = torch.as_tensor(self.optimum)

    def loss(self, phi: torch.Tensor) -> torch.Tensor:
        e = phi - self._opt.to(phi.dtype)
        return 0.5 * ((e @ self._H.to(phi.dtype)) * e).sum(-1) + self.min_loss

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        return (phi - self._opt.to(phi.dtype)) @ self._H.to(phi.dtype)

    def hessian_vector_product(self, phi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v @ self._H.to(phi.dtype)

    def affine_gradient(
        self, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        H = self._H.to(dtype)
        return H, -(self._opt.to(dtype) @ H)

    def sample_example_grads(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        R, d = phi.shape
        x = torch.randn(R, batch_size, d, generator=generator, dtype=phi.dtype)
        x = x @ self._H_half.to(phi.dtype)
        eps = torch.randn(R, batch_size, generator=generator, dtype=phi.dtype)
        e = phi - self._opt.to(phi.dtype)
        resid = (x * e.unsqueeze(1)).sum(-1) - self.noise_variance**0.5 * eps
        return x * resid.unsqueeze(-1)

    def gradient_covariance(self, phi: torch.Tensor) -> torch.Tensor:
        """``Sigma(Phi) = H e e^T H + (e^T H e + s^2) H`` per chain, ``(R, d, d)``."""
        H = self._H.to(phi.dtype)
        He = (phi - self._opt.to(phi.dtype)) @ H
        q = (He * (phi - self._opt.to(phi.dtype))).sum(-1) + self.noise_variance
        return He.unsqueeze(-1) * He.unsqueeze(-2) + q[:, None, None] * H
