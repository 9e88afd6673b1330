"""The contract every problem with per-example structure follows.

A problem is a loss ``L(Phi) = E_i l_i(Phi)`` over a population (``n is None``: each draw is a
fresh example) or over a finite data set of ``n`` examples (sampling with replacement, or by
reshuffled epochs). All methods are vectorised over chains: a state is an ``(R, d)`` tensor.

Reduction: the batch gradient is the *mean* of the per-example gradients of the batch,
``g_hat = (1/B) sum_b grad l_b``, so ``E g_hat = g`` and ``Cov g_hat = Sigma / B`` (with
replacement), ``Sigma(Phi) = Cov_i grad l_i(Phi)``. At the optimum ``Sigma = C = E_i g_i g_i^T``.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Problem"]


class Problem:
    """Base class: subclasses implement :meth:`loss`, :meth:`grad` and either
    :meth:`example_grads` (finite data) or :meth:`sample_example_grads` (population).

    Attributes that exist where the problem has them (else ``None``):
    ``hessian`` (d x d numpy, at the optimum), ``noise_covariance`` (C, d x d numpy),
    ``optimum`` (length-d numpy), ``min_loss`` (float L*).
    """

    dim: int = 1
    n: int | None = None
    hessian: np.ndarray | None = None
    noise_covariance: np.ndarray | None = None
    optimum: np.ndarray | None = None
    min_loss: float | None = None

    # -- full-batch quantities ---------------------------------------------------------------
    def loss(self, phi: torch.Tensor) -> torch.Tensor:
        """Full loss ``L(Phi)`` per chain, shape ``(R,)``."""
        raise NotImplementedError

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        """Full gradient ``g(Phi)``, shape ``(R, d)``."""
        raise NotImplementedError

    def hessian_vector_product(self, phi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``H(Phi) v`` per chain by differentiating :meth:`grad` (exact, autograd)."""
        with torch.enable_grad():
            x = phi.detach().clone().requires_grad_(True)
            g = self.grad(x)
            (hv,) = torch.autograd.grad((g * v).sum(), x)
        return hv.detach()

    # -- stochastic gradients ----------------------------------------------------------------
    def example_grads(self, phi: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Per-example gradients of data points ``indices`` (``(R, B)`` long): ``(R, B, d)``."""
        raise NotImplementedError(f"{type(self).__name__} has no finite data set (n is None)")

    def sample_example_grads(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Per-example gradients of a batch drawn with replacement: ``(R, B, d)``."""
        if self.n is None:
            raise NotImplementedError
        idx = torch.randint(0, self.n, (phi.shape[0], batch_size), generator=generator)
        return self.example_grads(phi, idx)

    def sample_grad(
        self, phi: torch.Tensor, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """A batch-mean gradient ``g_hat`` (with replacement), shape ``(R, d)``.

        Subclasses with Gaussian additive noise override this with the exact-in-law shortcut
        ``g + (C/B)^{1/2} z``.
        """
        return self.sample_example_grads(phi, batch_size, generator).mean(dim=1)

    def affine_gradient(
        self, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(M, c)`` with ``g(Phi) = Phi @ M + c`` exactly when the full gradient is affine
        (quadratic losses), else None. Simulators use it to fuse a step into one matmul."""
        return None

    def additive_noise_sqrt(self, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        """``K`` (d x d) when per-example gradients are ``grad L + K^T z``, z standard normal,
        independent of the state (additive Gaussian noise: ``C = K^T K``), else None. The SGD
        simulator then draws the batch noise ``K^T z / sqrt(B)`` in blocks."""
        return None

    # -- helpers -----------------------------------------------------------------------------
    def excess_loss(self, phi: torch.Tensor) -> torch.Tensor:
        """``L(Phi) - L*`` per chain (needs ``min_loss``)."""
        if self.min_loss is None:
            raise ValueError(f"{type(self).__name__} has no known min_loss; use loss() instead")
        return self.loss(phi) - self.min_loss

    def noise_std(self) -> np.ndarray:
        """Per-coordinate noise scale ``sigma_i = sqrt(C_ii)`` at the optimum."""
        if self.noise_covariance is None:
            raise ValueError(f"{type(self).__name__} has no known noise covariance")
        return np.sqrt(np.diag(self.noise_covariance))
