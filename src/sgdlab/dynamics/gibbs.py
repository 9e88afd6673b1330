"""One-dimensional Gibbs densities, numerically normalised, and the Gibbs-alpha estimate.

The Langevin SDE ``dX = -L'(X) dt + sqrt(eta sigma^2 / B) dW`` has the stationary density
``p(x) ∝ exp(-L(x)/T)`` with temperature ``T = eta sigma^2 / (2B)``, i.e.
``p ∝ exp(-2 L / (eta sigma^2 / B))``. The lecture writes ``exp(-L/(alpha eta sigma^2))`` with
``alpha ≈ 1/10``; the exact value is ``alpha = 1/2`` (``sigma^2`` the per-example variance).
:func:`estimate_gibbs_alpha` recovers alpha from samples by matching ``E_T[L]`` (the maximum
likelihood equation of the exponential family ``exp(-L/T)``).

Example::

    >>> from sgdlab.dynamics import langevin_stationary_density
    >>> p = langevin_stationary_density(lambda x: x**4 / 4, lr=0.1, sigma2=1.0)
    >>> round(p.expect(lambda x: x**4 / 4), 6)   # E_T[x^4/4] = T/4, T = 0.05
    0.0125
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._validation import check_batch_size, check_positive

__all__ = ["GibbsDensity", "estimate_gibbs_alpha", "langevin_stationary_density"]


class GibbsDensity:
    """``p(x) = exp(-L(x)/T) / Z`` on ``[lower, upper]`` (Z by adaptive quadrature).

    ``loss`` must accept numpy arrays. The interval should hold essentially all the mass;
    by default it is found from the loss (where ``(L - L_min)/T`` exceeds 60).
    """

    def __init__(
        self,
        loss: Callable[[np.ndarray], np.ndarray],
        temperature: float,
        lower: float | None = None,
        upper: float | None = None,
    ) -> None:
        from scipy.integrate import quad

        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        self.loss = loss
        self.temperature = T = check_positive("temperature", temperature)
        lo, hi = self._bounds(lower, upper)
        self.lower, self.upper = lo, hi
        grid = np.linspace(lo, hi, 20001)
        self._shift = float(np.min(loss(grid)))
        # break points for every integral: the mode (a narrow mass far from the midpoint of a
        # wide interval is otherwise missed: expectations of 0) and the midpoint
        self._breaks = sorted({*self._points(grid), 0.5 * (lo + hi)})
        self.normaliser = quad(
            self._unnormalised, lo, hi, points=self._breaks, limit=500, epsabs=0, epsrel=1e-12
        )[0]
        if not (np.isfinite(self.normaliser) and self.normaliser > 0):
            raise ValueError(f"the Gibbs density at T={T} cannot be normalised on [{lo}, {hi}]")
        # cumulative distribution on a fine grid (trapezoid on 2e5 points: error ~1e-10)
        from scipy.integrate import cumulative_trapezoid

        self._grid = np.linspace(lo, hi, 200001)
        c = cumulative_trapezoid(self.pdf(self._grid), self._grid, initial=0.0)
        self._cdf = c / c[-1]

    def _bounds(self, lower: float | None, upper: float | None) -> tuple[float, float]:
        if lower is not None and upper is not None:
            if not lower < upper:
                raise ValueError(f"need lower < upper, got {lower}, {upper}")
            return float(lower), float(upper)
        T = self.temperature
        x = np.linspace(-1e3, 1e3, 400001)
        v = (self.loss(x) - np.min(self.loss(x))) / T
        inside = np.nonzero(v < 60.0)[0]
        if inside.size == 0 or inside[0] == 0 or inside[-1] == x.size - 1:
            raise ValueError("could not bracket the density's mass; pass lower and upper")
        lo = x[inside[0] - 1] if lower is None else float(lower)
        hi = x[inside[-1] + 1] if upper is None else float(upper)
        return float(lo), float(hi)

    def _points(self, grid: np.ndarray) -> list[float]:
        v = self.loss(grid)
        return [float(grid[np.argmin(v)])]

    def _unnormalised(self, x: Any) -> Any:
        return np.exp(-(self.loss(x) - self._shift) / self.temperature)

    def pdf(self, x: Any) -> np.ndarray:
        """Density at x (0 outside [lower, upper])."""
        x = np.asarray(x, dtype=np.float64)
        inside = (x >= self.lower) & (x <= self.upper)
        return np.where(inside, self._unnormalised(x) / self.normaliser, 0.0)

    def cdf(self, x: Any) -> np.ndarray:
        """Distribution function (interpolated from a fine cumulative quadrature)."""
        return np.interp(
            np.asarray(x, dtype=np.float64), self._grid, self._cdf, left=0.0, right=1.0
        )

    def expect(self, f: Callable[[np.ndarray], np.ndarray]) -> float:
        """``E_p f(X)`` by adaptive quadrature."""
        from scipy.integrate import quad

        val = quad(
            lambda x: f(x) * self._unnormalised(x),
            self.lower,
            self.upper,
            points=self._breaks,
            limit=500,
            epsabs=1e-14 * self.normaliser,
            epsrel=1e-10,
        )[0]
        return val / self.normaliser

    def variance(self) -> float:
        m = self.expect(lambda x: x)
        return self.expect(lambda x: (x - m) ** 2)


def langevin_stationary_density(
    loss: Callable[[np.ndarray], np.ndarray],
    lr: float,
    sigma2: float,
    batch_size: int = 1,
    lower: float | None = None,
    upper: float | None = None,
) -> GibbsDensity:
    """Stationary density ``p ∝ exp(-2 L / (eta sigma^2 / B))`` of 1-D Langevin dynamics."""
    eta, s2 = check_positive("lr", lr), check_positive("sigma2", sigma2)
    B = check_batch_size("batch_size", batch_size)
    return GibbsDensity(loss, eta * s2 / (2.0 * B), lower, upper)


def estimate_gibbs_alpha(
    loss_means: Any,
    loss: Callable[[np.ndarray], np.ndarray],
    lr: float,
    sigma2: float,
    batch_size: int = 1,
) -> tuple[float, float]:
    """Estimate alpha in ``p ∝ exp(-L/(alpha eta sigma^2 / B))`` from per-chain time averages
    of ``L`` (an ``(R,)`` array, chains independent; ``loss`` is the same L for numpy arrays).

    Solves ``E_T[L] = mean`` for T (``E_T[L]`` increases with T: ``dE/dT = Var_T(L)/T^2``),
    then ``alpha = T B / (eta sigma^2)``. The standard error follows by the delta method from
    the spread across chains. Exact Gibbs dynamics give 1/2.
    """
    from scipy.optimize import brentq

    m_arr = np.asarray(loss_means, dtype=np.float64).reshape(-1)
    if m_arr.size < 2 or not np.all(np.isfinite(m_arr)):
        raise ValueError("loss_means must hold >= 2 finite per-chain averages")
    eta, s2 = check_positive("lr", lr), check_positive("sigma2", sigma2)
    B = check_batch_size("batch_size", batch_size)
    m = float(m_arr.mean())
    se = float(m_arr.std(ddof=1) / np.sqrt(m_arr.size))
    scale = eta * s2 / B

    def mean_loss(T: float) -> float:
        return GibbsDensity(loss, T).expect(loss)

    lo, hi = 1e-3 * scale, 1e3 * scale
    f_lo, f_hi = mean_loss(lo) - m, mean_loss(hi) - m
    if not f_lo < 0 < f_hi:
        raise ValueError(
            f"the mean loss {m} is not E_T[L] for any T in [{lo:.3g}, {hi:.3g}] "
            "(alpha outside [1e-3, 1e3]); check loss, lr, sigma2 and batch_size"
        )
    T = brentq(lambda T: mean_loss(T) - m, lo, hi, xtol=1e-14 * scale, rtol=1e-12)
    dens = GibbsDensity(loss, T)
    mL = dens.expect(loss)
    varL = dens.expect(lambda x: (loss(x) - mL) ** 2)
    se_T = se * T**2 / varL
    return T / scale, se_T / scale
