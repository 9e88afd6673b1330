"""Per-coordinate preconditioners for the SGD simulator: fixed (``1/sigma``, ``1/sigma^2``, any
vector) or RMSProp's running estimate of the second moment.

Update with a preconditioner ``P`` (diagonal): ``Phi[i] -= eta P[i] g_hat[i]``. The per-coordinate
learning rate is ``eta_i = eta P[i]`` and, for additive noise, coordinate i runs at temperature
``T_i = eta_i sigma_i^2 / (2B)``: ``P = 1/sigma^2`` (the lecture's form (2), units-consistent)
gives one temperature, a Gibbs law; ``P = 1/sigma`` (form (1), RMSProp-like) gives
``T_i = eta sigma_i / (2B)``. Preconditioned SGD is Gibbs iff ``P`` is proportional to ``C^{-1}``.

RMSProp (lecture form, Tieleman & Hinton 2012):
``s_t = (1 - 1/min(t, N_s)) s_{t-1} + (1/min(t, N_s)) q_t`` with ``q_t = g_hat^2`` ("batch",
torch's choice) or ``q_t = (1/B) sum_b g_b^2`` ("per_example", the lecture's batch-size-
invariant choice); ``P = 1/(s^power + eps)`` (eps "outside", torch) or ``1/(s + eps)^power``
("inside", the lecture's slide). ``power = 0.5`` is RMSProp, ``power = 1`` the 1/sigma^2 form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._validation import check_choice, check_horizon, check_nonnegative

__all__ = ["RMSPropPreconditioner"]


@dataclass(frozen=True)
class RMSPropPreconditioner:
    """RMSProp's running second-moment preconditioner (see the module docstring)."""

    horizon: float = 100.0
    eps: float = 1e-8
    power: float = 0.5
    eps_placement: str = "outside"
    second_moment: str = "batch"

    def __post_init__(self) -> None:
        check_horizon("horizon", self.horizon)
        check_nonnegative("eps", self.eps)
        check_choice("power", self.power, (0.5, 1.0))
        check_choice("eps_placement", self.eps_placement, ("outside", "inside"))
        check_choice("second_moment", self.second_moment, ("batch", "per_example"))

    def weight(self, s: torch.Tensor) -> torch.Tensor:
        if self.eps_placement == "outside":
            return 1.0 / (s.pow(self.power) + self.eps)
        return 1.0 / (s + self.eps).pow(self.power)


def resolve_fixed_preconditioner(
    preconditioner: Any, problem, dtype: torch.dtype
) -> torch.Tensor | None:
    """None, "inverse_std", "inverse_variance" or a positive length-d vector -> tensor or None."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, str):
        check_choice("preconditioner", preconditioner, ("inverse_std", "inverse_variance"))
        sigma = problem.noise_std()
        if np.any(sigma <= 0):
            raise ValueError(f"preconditioner={preconditioner!r} needs sigma_i > 0, got {sigma}")
        p = 1.0 / sigma if preconditioner == "inverse_std" else 1.0 / sigma**2
        return torch.as_tensor(p, dtype=dtype)
    p = np.asarray(preconditioner, dtype=np.float64)
    if p.ndim == 0:
        p = np.full(problem.dim, float(p))
    if p.shape != (problem.dim,) or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(
            "preconditioner must be None, 'inverse_std', 'inverse_variance', an "
            f"RMSPropPreconditioner or a positive length-{problem.dim} vector; "
            f"got {preconditioner!r}"
        )
    return torch.as_tensor(p, dtype=dtype)
