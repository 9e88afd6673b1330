"""Per-coordinate temperatures from samples by equipartition.

For a Gibbs law ``p ∝ exp(-L/T)`` integration by parts gives ``E[x_i d_i L] = T`` for every
coordinate (equipartition; the virial theorem). For SGD with per-coordinate rates ``eta_i`` on a
separable loss with additive noise, coordinate i runs at its own temperature ``T_i``; the
estimate ``T_i = E[(x_i - x*_i) g_i(x)]`` from time averages then exposes non-Gibbs laws
(unequal T_i). For plain SGD the discrete relation ``E[e_i g_i] = (eta_i/2) E[g_hat_i^2]`` holds
exactly per coordinate of a separable problem; on a quadratic coordinate ``T_i = h_i Var_i``,
whose exact discrete value is ``eta_i sigma_i^2 / (B (2 - eta_i h_i))``.

Example::

    >>> import numpy as np
    >>> from sgdlab.dynamics import (Separable, simulate_sgd, estimate_temperatures,
    ...                              coordinate_temperatures)
    >>> p = Separable(curvatures=[1.0, 1.0], noise_std=[1.0, 3.0])
    >>> r = simulate_sgd(p, 0.1, steps=2000, chains=400, preconditioner="inverse_variance",
    ...                  burn_in=500, observables=estimate_temperatures.observables(p))
    >>> T, se = estimate_temperatures(r)   # eta_i = 0.1 / sigma_i^2: one temperature, ~0.05
    >>> exact = coordinate_temperatures([1, 1], [1, 9], 0.1 / np.array([1.0, 9.0]))
    >>> bool(np.all(np.abs(T - exact) < 4 * se))
    True
"""

from __future__ import annotations

import numpy as np
import torch

from .estimators import estimate_mean
from .result import ChainResult

__all__ = ["estimate_temperatures"]


def _observables(problem) -> dict:
    center = torch.as_tensor(
        problem.optimum if problem.optimum is not None else np.zeros(problem.dim)
    )

    def virial(phi: torch.Tensor) -> torch.Tensor:
        return (phi - center.to(phi.dtype)) * problem.grad(phi)

    return {"virial": virial}


def estimate_temperatures(result: ChainResult) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate temperatures ``E[(x_i - x*_i) g_i]`` and standard errors across chains.

    The run must have been made with ``observables=estimate_temperatures.observables(problem)``.
    """
    if "virial" not in result.observables:
        raise ValueError(
            "run the simulation with observables=estimate_temperatures.observables(problem)"
        )
    m, se = estimate_mean(result.observables["virial"])
    return np.atleast_1d(m), np.atleast_1d(se)


estimate_temperatures.observables = _observables  # type: ignore[attr-defined]
