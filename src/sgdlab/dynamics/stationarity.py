"""A stationarity test from the fluctuation-dissipation relation, usable during training.

For plain SGD ``Phi_{t+1} = Phi_t - eta g_hat_t`` with constant eta and any fixed point c,
``||Phi_{t+1} - c||^2 - ||Phi_t - c||^2 = -2 eta (Phi_t - c).g_hat_t + eta^2 ||g_hat_t||^2``,
so at stationarity (Yaida 2018, "Fluctuation-dissipation relations for stochastic gradient
descent")

    E[(Phi - c) . g_hat] = (eta / 2) E ||g_hat||^2.

For a quadratic with c = Phi* the left side is ``2 (E L - L*)``: the excess loss is
``(eta/4) E||g_hat||^2``. Far from stationarity (still descending) the left side dominates.
The test accumulates ``O_L = (Phi - c).g_hat`` and ``O_R = (eta/2)||g_hat||^2`` and declares
stationarity when the confidence interval of ``mean(O_L - O_R)`` lies inside
``±tolerance * mean(O_R)`` (the rule of Lang, Xiao & Zhang 2019, "Using statistics to automate
stochastic optimization", which drops the learning rate when it holds). Only the most recent
``keep`` fraction of the samples since the last reset enter (early transients are dropped).
Standard errors: across chains when R >= 2, else by batch means over time.

Example (inside a training loop; ``params`` a flat tensor, ``grad`` its minibatch gradient)::

    test = FluctuationDissipationTest()
    ...
    test.update(params, grad, lr)        # before optimizer.step()
    if test.steps >= 1000 and test.is_stationary():
        lr /= 10; test.reset()
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from .._validation import check_positive

__all__ = ["FluctuationDissipationTest"]


class FluctuationDissipationTest:
    """Online check of ``E[(Phi - c).g_hat] = (eta/2) E||g_hat||^2`` (plain SGD, constant eta).

    Args:
        center: the fixed point c (default 0: raw parameters; any fixed c is valid).
        keep: fraction of the most recent samples used (0 < keep <= 1).
        batches: number of batch means for the single-chain standard error.
    """

    def __init__(self, center: Any = None, keep: float = 0.5, batches: int = 20) -> None:
        self.keep = check_positive("keep", keep)
        if self.keep > 1:
            raise ValueError(f"keep must satisfy 0 < keep <= 1, got {keep}")
        if isinstance(batches, numbers.Integral) and not isinstance(batches, bool):
            batches = int(batches)
        if not isinstance(batches, int) or batches < 2:
            raise ValueError(f"batches must be an integer >= 2, got {batches!r}")
        self.batches = batches
        self.center = None if center is None else torch.as_tensor(center, dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        """Forget all samples (call after changing the learning rate)."""
        self._n = 0
        self._diff = np.empty((0, 0))
        self._rhs = np.empty((0, 0))

    @property
    def steps(self) -> int:
        return self._n

    def _append(self, diff: np.ndarray, rhs: np.ndarray) -> None:
        if self._n == 0 or self._diff.shape[1] != diff.size:
            if self._n:
                raise ValueError(
                    f"the number of chains changed from {self._diff.shape[1]} to "
                    f"{diff.size}; call reset() first"
                )
            self._diff = np.empty((64, diff.size))
            self._rhs = np.empty((64, diff.size))
        if self._n == self._diff.shape[0]:  # amortised doubling
            self._diff = np.concatenate([self._diff, np.empty_like(self._diff)])
            self._rhs = np.concatenate([self._rhs, np.empty_like(self._rhs)])
        self._diff[self._n] = diff
        self._rhs[self._n] = rhs
        self._n += 1

    def update(self, params: Any, grad: Any, lr: float) -> None:
        """Record one step: parameters ``Phi_t`` (before the step), the minibatch gradient
        ``g_hat_t`` at them and the learning rate. Shapes ``(d,)`` or ``(R, d)`` (R chains);
        a list of tensors (a model's parameters) is flattened."""
        eta = check_positive("lr", lr)
        p = self._flat(params)
        g = self._flat(grad)
        if p.shape != g.shape:
            raise ValueError(f"params and grad shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}")
        e = p if self.center is None else p - self.center.to(p.dtype)
        lhs = (e * g).sum(-1)
        rhs = 0.5 * eta * (g * g).sum(-1)
        self._append(
            (lhs - rhs).to(torch.float64).reshape(-1).cpu().numpy(),
            rhs.to(torch.float64).reshape(-1).cpu().numpy(),
        )

    @staticmethod
    def _flat(x: Any) -> torch.Tensor:
        if isinstance(x, list | tuple):
            return torch.cat([torch.as_tensor(t).detach().reshape(-1) for t in x])
        t = torch.as_tensor(x).detach()
        return t if t.ndim >= 1 else t.reshape(1)

    def statistic(self) -> tuple[float, float, float]:
        """``(mean(O_L - O_R), its standard error, mean(O_R))`` over the kept samples."""
        n = self.steps
        if n < 2 * self.batches:
            raise ValueError(f"need at least {2 * self.batches} steps, have {n}")
        start = n - max(2 * self.batches, int(math.ceil(self.keep * n)))
        D = self._diff[start:n]  # (T, R)
        Rh = self._rhs[start:n]
        mean_rhs = float(Rh.mean())
        per_chain = D.mean(axis=0)
        if per_chain.size >= 2:
            return (
                float(per_chain.mean()),
                float(per_chain.std(ddof=1) / np.sqrt(per_chain.size)),
                mean_rhs,
            )
        T = D.shape[0] // self.batches * self.batches
        bm = D[-T:, 0].reshape(self.batches, -1).mean(axis=1)
        return float(bm.mean()), float(bm.std(ddof=1) / np.sqrt(self.batches)), mean_rhs

    def z(self) -> float:
        """``mean(O_L - O_R) / stderr``: |z| small at stationarity."""
        m, se, _ = self.statistic()
        return m / se if se > 0 else math.inf

    def is_stationary(self, tolerance: float = 0.1, confidence: float = 2.0) -> bool:
        """True when ``|mean(O_L - O_R)| + confidence * stderr < tolerance * mean(O_R)``."""
        tol = check_positive("tolerance", tolerance)
        conf = check_positive("confidence", confidence)
        m, se, rhs = self.statistic()
        return abs(m) + conf * se < tol * rhs
