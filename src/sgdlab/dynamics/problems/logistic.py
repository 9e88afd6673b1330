"""Logistic regression on a finite data set (per-example structure, state-dependent noise).

Per-example loss ``l_i(w) = log(1 + exp(-y_i x_i^T w)) + (lam/2) ||w||^2`` with ``y_i in {-1,+1}``
(labels in {0, 1} are mapped), mean reduction over the n examples. The optimum is found by
Newton's method in float64; ``hessian`` and ``noise_covariance`` (``C = (1/n) sum g_i g_i^T``,
the per-example gradients at the optimum, which average to zero) are evaluated there.

Example::

    >>> from sgdlab.dynamics import LogisticRegression
    >>> p = LogisticRegression.synthetic(n=200, dim=2, seed=0)
    >>> p.n, p.dim
    (200, 2)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..._validation import check_count, check_nonnegative
from .base import Problem

__all__ = ["LogisticRegression"]


class LogisticRegression(Problem):
    """Binary logistic regression with optional L2 penalty ``l2`` (per example)."""

    def __init__(self, inputs: Any, labels: Any, l2: float = 0.0) -> None:
        X = np.asarray(inputs, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] < 2:
            raise ValueError(f"inputs must be (n, d) and labels (n,), got {X.shape}, {y.shape}")
        if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
            raise ValueError("inputs and labels must be finite")
        labels_set = set(np.unique(y).tolist())
        if labels_set <= {0.0, 1.0}:
            y = 2.0 * y - 1.0
        elif not labels_set <= {-1.0, 1.0}:
            raise ValueError(f"labels must be in {{0, 1}} or {{-1, +1}}, got {sorted(labels_set)}")
        self.l2 = check_nonnegative("l2", l2)
        self.n, self.dim = X.shape
        self.inputs, self.labels = X, y
        self._X = torch.as_tensor(X)
        self._y = torch.as_tensor(y)
        w = self._newton()
        self.optimum = w
        wt = torch.as_tensor(w).unsqueeze(0)
        self.min_loss = float(self.loss(wt)[0])
        G = self.example_grads(wt, torch.arange(self.n).unsqueeze(0))[0].numpy()
        self.noise_covariance = G.T @ G / self.n
        s = 1.0 / (1.0 + np.exp(-y * (X @ w)))
        self.hessian = (X.T * (s * (1 - s))) @ X / self.n + self.l2 * np.eye(self.dim)

    @classmethod
    def synthetic(
        cls, n: int, dim: int, seed: int = 0, scale: float = 1.0, l2: float = 0.0
    ) -> LogisticRegression:
        """Gaussian inputs, labels drawn from a logistic model with weights ``scale * u``."""
        n, dim = check_count("n", n), check_count("dim", dim)
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((n, dim))
        w = scale * rng.standard_normal(dim) / np.sqrt(dim)
        p = 1.0 / (1.0 + np.exp(-X @ w))
        y = np.where(rng.random(n) < p, 1.0, -1.0)
        return cls(X, y, l2=l2)

    def _objective(self, w: np.ndarray) -> float:
        m = self.labels * (self.inputs @ w)
        return float(np.mean(np.logaddexp(0.0, -m)) + 0.5 * self.l2 * w @ w)

    def _newton(self, iters: int = 200) -> np.ndarray:
        """Damped Newton (backtracking on the loss) from 0, in float64."""
        X, y, n = self.inputs, self.labels, self.n
        separable = ValueError(
            "the data are linearly separable: the logistic optimum is at infinity; pass l2 > 0"
        )
        w = np.zeros(self.dim)
        f = self._objective(w)
        for _ in range(iters):
            m = y * (X @ w)
            s = 1.0 / (1.0 + np.exp(-m))
            g = -(X.T @ (y * (1 - s))) / n + self.l2 * w
            H = (X.T * (s * (1 - s))) @ X / n + self.l2 * np.eye(self.dim)
            try:
                step = np.linalg.solve(H, g)
            except np.linalg.LinAlgError:
                raise separable from None
            t = 1.0
            while t > 1e-12:
                w_new = w - t * step
                f_new = self._objective(w_new)
                if f_new <= f - 1e-4 * t * (g @ step):
                    break
                t *= 0.5
            converged = np.abs(w_new - w).max() < 1e-13 * max(1.0, np.abs(w_new).max())
            w, f = w_new, f_new
            if not np.all(np.isfinite(w)) or np.abs(w).max() > 1e6:
                raise separable
            if converged or np.abs(g).max() < 1e-15:
                break
        else:
            raise separable
        if self.l2 == 0.0:
            # at a finite optimum the Hessian is positive definite; running off to infinity
            # (separable data) drives it to zero
            s = 1.0 / (1.0 + np.exp(-y * (X @ w)))
            H = (X.T * (s * (1 - s))) @ X / n
            scale = np.trace(X.T @ X / n) / self.dim
            if np.linalg.eigvalsh(H).min() < 1e-8 * scale:
                raise separable
        return w

    def loss(self, phi: torch.Tensor) -> torch.Tensor:
        m = (phi @ self._X.to(phi.dtype).T) * self._y.to(phi.dtype)
        return torch.nn.functional.softplus(-m).mean(-1) + 0.5 * self.l2 * (phi * phi).sum(-1)

    def grad(self, phi: torch.Tensor) -> torch.Tensor:
        X, y = self._X.to(phi.dtype), self._y.to(phi.dtype)
        m = (phi @ X.T) * y
        coef = -y * torch.sigmoid(-m)
        return coef @ X / self.n + self.l2 * phi

    def example_grads(self, phi: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        X, y = self._X.to(phi.dtype)[indices], self._y.to(phi.dtype)[indices]
        m = (X * phi.unsqueeze(1)).sum(-1) * y
        coef = -y * torch.sigmoid(-m)
        return coef.unsqueeze(-1) * X + self.l2 * phi.unsqueeze(1)
