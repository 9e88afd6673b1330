"""Quadratic loss with additive Gaussian gradient noise (a population problem).

Per-example loss ``l_xi(Phi) = (1/2) e^T H e + xi^T e + L*`` with ``e = Phi - Phi*`` and
``xi ~ N(0, C)``; hence ``L(Phi) = (1/2) e^T H e + L*``, ``g = H e`` and per-example gradients
``H e + xi`` whose covariance is ``C`` everywhere (additive noise). This is the model behind the
lecture's converged loss ``L(eta)``: constant-lr SGD has the stationary covariance
``S = (I - eta H) S (I - eta H) + eta^2 C / B`` (see :mod:`sgdlab.dynamics.lyapunov`).

Example::

    >>> import torch
    >>> from sgdlab.dynamics import Quadratic
    >>> p = Quadratic(hessian=[1.0, 0.5], noise_covariance=[1.0, 2.0])
    >>> p.grad(torch.ones(3, 2, dtype=torch.float64)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._common import as_matrix, as_vector, psd_sqrt
from .base import Problem

__all__ = ["Quadratic"]


class Quadratic(Problem):
    """``L = (1/2)(Phi - Phi*)^T H (Phi - Phi*) + L*`` with per-example gradient noise N(0, C).

    Args:
        hessian: H, a d x d symmetric PSD matrix (a vector means a diagonal, a scalar d = 1).
        noise_covariance: C, the per-example gradient covariance (same shapes accepted).
        optimum: Phi* (default 0).  min_loss : L* (default 0).
    """

    def __init__(
        self, hessian: Any, noise_covariance: Any, optimum: Any = None, min_loss: float = 0.0
    ) -> None:
        H = as_matrix("hessian", hessian, psd=True)
        d = H.shape[0]
        C = as_matrix("noise_covariance", noise_covariance, d, psd=True)
        self.dim = d
        self.hessian = H
        self.noise_covariance = C
        self.optimum = np.zeros(d) if optimum is None else as_vector("optimum", optimum, d)
        self.min_loss = float(min_loss)
        self._H = torch.as_tensor(H)
        self._opt = torch.as_tensor(self.optimum)
        self._C_half = torch.as_tensor(psd_sqrt(C))

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

    def additive_noise_sqrt(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return self._C_half.to(dtype)

    def sample_example_grads(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        z = torch.randn(phi.shape[0], batch_size, self.dim, generator=generator, dtype=phi.dtype)
        return self.grad(phi).unsqueeze(1) + z @ self._C_half.to(phi.dtype)

    def sample_grad(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        z = torch.randn(phi.shape[0], self.dim, generator=generator, dtype=phi.dtype)
        return self.grad(phi) + (z @ self._C_half.to(phi.dtype)) / batch_size**0.5

    def gradient_covariance(self, phi: torch.Tensor) -> torch.Tensor:
        """``Sigma(Phi) = C`` for every chain (additive noise): ``(R, d, d)``."""
        C = torch.as_tensor(self.noise_covariance, dtype=phi.dtype)
        return C.expand(phi.shape[0], self.dim, self.dim)
