"""Non-quadratic potentials with additive Gaussian gradient noise: double well, quartic,
and separable per-coordinate losses.

Per-example gradient ``grad L(Phi) + xi`` with ``xi ~ N(0, diag(sigma_i^2))`` (additive noise,
``Sigma = C`` everywhere), so constant-lr SGD is exactly the Euler-Maruyama scheme, step
``dt = eta``, of the Langevin SDE ``d Phi = -g dt + sqrt(eta C / B) dW``, whose stationary law is
Gibbs, ``p ∝ exp(-2 L / (eta sigma^2 / B))`` in 1-D (temperature ``T = eta sigma^2 / (2B)``).

* :class:`DoubleWell`: ``L = (x^2 - 1)^2 / 4``, minima at ±1, barrier 1/4 at 0.
* :class:`Quartic`: ``L = x^4 / 4`` (no curvature at the optimum: the stationary law is far
  from Gaussian, so it tests Gibbs and not a quadratic approximation).
* :class:`Separable`: ``L = sum_i a_i x_i^2/2 + b_i x_i^4/4`` with noise ``sigma_i`` per
  coordinate; per-coordinate rates ``eta_i`` give temperatures ``T_i = eta_i sigma_i^2/(2B)``.

Example::

    >>> import torch
    >>> from sgdlab.dynamics import DoubleWell
    >>> float(DoubleWell().loss(torch.zeros(1, 1, dtype=torch.float64))[0])
    0.25
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..._validation import check_positive
from .._common import as_vector
from .base import Problem

__all__ = ["DoubleWell", "Quartic", "Separable"]


class Separable(Problem):
    """``L = sum_i a_i x_i^2 / 2 + b_i x_i^4 / 4`` with independent noise ``sigma_i``."""

    def __init__(self, curvatures: Any, noise_std: Any, quartic: Any = 0.0) -> None:
        a = as_vector("curvatures", curvatures)
        d = a.shape[0]
        b = as_vector("quartic", quartic, d)
        s = as_vector("noise_std", noise_std, d)
        if np.any(a < 0) or np.any(b < 0) or np.any(s < 0):
            raise ValueError(f"curvatures, quartic and noise_std must be >= 0, got {a}, {b}, {s}")
        if np.any((a == 0) & (b == 0)):
            raise ValueError("every coordinate needs a confining term: a_i > 0 or b_i > 0")
        self.dim = d
        self.curvatures, self.quartic, self.sigma = a, b, s
        self.hessian = np.diag(a)
        self.noise_covariance = np.diag(s**2)
        self.optimum = np.zeros(d)
        self.min_loss = 0.0
        self._a, self._b, self._s = (torch.as_tensor(v) for v in (a, b, s))

    def loss_numpy(self, x: np.ndarray, coordinate: int = 0) -> np.ndarray:
        """One coordinate's loss term as a numpy function (for densities and quadrature)."""
        a, b = self.curvatures[coordinate], self.quartic[coordinate]
        return 0.5 * a * x**2 + 0.25 * b * x**4

    def loss(self, phi: torch.Tensor) -> torch.Tensor:
        a, b = self._a.to(phi.dtype), self._b.to(phi.dtype)
        return (0.5 * a * phi**2 + 0.25 * b * phi**4).sum(-1)

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        return self._a.to(phi.dtype) * phi + self._b.to(phi.dtype) * phi**3

    def hessian_vector_product(self, phi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self._a.to(phi.dtype) + 3 * self._b.to(phi.dtype) * phi**2) * v

    def additive_noise_sqrt(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.diag(self._s.to(dtype))

    def sample_example_grads(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        z = torch.randn(phi.shape[0], batch_size, self.dim, generator=generator, dtype=phi.dtype)
        return self.grad(phi).unsqueeze(1) + z * self._s.to(phi.dtype)

    def sample_grad(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        z = torch.randn(phi.shape[0], self.dim, generator=generator, dtype=phi.dtype)
        return self.grad(phi) + z * (self._s.to(phi.dtype) / batch_size**0.5)

    def gradient_covariance(self, phi: torch.Tensor) -> torch.Tensor:
        C = torch.as_tensor(self.noise_covariance, dtype=phi.dtype)
        return C.expand(phi.shape[0], self.dim, self.dim)


class Quartic(Separable):
    """1-D ``L = x^4 / 4`` with per-example gradient noise ``sigma``."""

    def __init__(self, noise_std: float = 1.0) -> None:
        super().__init__([0.0], [check_positive("noise_std", noise_std)], quartic=[1.0])


class DoubleWell(Problem):
    """1-D ``L = (x^2 - 1)^2 / 4``, gradient ``x^3 - x``, per-example noise ``sigma``."""

    def __init__(self, noise_std: float = 1.0) -> None:
        self.sigma_value = check_positive("noise_std", noise_std)
        self.dim = 1
        self.hessian = np.array([[2.0]])
        self.noise_covariance = np.array([[self.sigma_value**2]])
        self.optimum = np.array([1.0])
        self.min_loss = 0.0

    @staticmethod
    def loss_numpy(x: np.ndarray, coordinate: int = 0) -> np.ndarray:
        return 0.25 * (x**2 - 1.0) ** 2

    def loss(self, phi: torch.Tensor) -> torch.Tensor:
        return (0.25 * (phi**2 - 1.0) ** 2).sum(-1)

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        return phi**3 - phi

    def hessian_vector_product(self, phi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (3 * phi**2 - 1.0) * v

    def additive_noise_sqrt(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.tensor([[self.sigma_value]], dtype=dtype)

    def sample_example_grads(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        z = torch.randn(phi.shape[0], batch_size, 1, generator=generator, dtype=phi.dtype)
        return self.grad(phi).unsqueeze(1) + self.sigma_value * z

    def sample_grad(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        z = torch.randn(phi.shape[0], 1, generator=generator, dtype=phi.dtype)
        return self.grad(phi) + (self.sigma_value / batch_size**0.5) * z

    def gradient_covariance(self, phi: torch.Tensor) -> torch.Tensor:
        C = torch.as_tensor(self.noise_covariance, dtype=phi.dtype)
        return C.expand(phi.shape[0], 1, 1)
