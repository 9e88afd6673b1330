"""What a chain simulation returns: per-chain time averages (bounded memory) and, on request,
a thinned trajectory.

Every average is over the states ``Phi_t`` at which a gradient is evaluated,
``t = burn_in, ..., steps - 1`` (so ``loss``, ``grad_sq`` and ``fdr_lhs`` refer to the same
states). Average across chains with :func:`sgdlab.dynamics.estimate_mean` to get a mean and a
standard error from the spread across chains (chains are independent; time steps are not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["ChainResult"]


@dataclass
class ChainResult:
    """Result of :func:`simulate_sgd` / :func:`simulate_langevin`.

    Attributes:
        final: (R, d) state after the last step.
        mean: (R, d) time average of ``Phi``.
        second_moment: (R, d, d) time average of ``(Phi - c)(Phi - c)^T``, ``c`` = ``center``.
        loss: (R,) time average of the full loss ``L(Phi)``.
        excess_loss: (R,) time average of ``L(Phi) - L*`` (None when L* is unknown).
        grad_sq: (R,) time average of ``||g_hat||^2`` (the batch gradient used; SGD only).
        fdr_lhs: (R,) time average of ``(Phi - c) . g_hat`` (SGD only). For plain SGD at
            stationarity ``E[(Phi - c) . g_hat] = (eta/2) E||g_hat||^2`` exactly (Yaida 2018).
        observables: time averages of the user's functions ``f(Phi) -> (R,) or (R, k)``.
        trajectory: (K, R, d) states at ``record_steps`` (None unless requested).
        record_steps: (K,) step indices of the trajectory.
        times: (K,) "time" ``t = sum of learning rates`` (SGD) or ``k dt`` (Langevin) there.
        steps, burn_in: the run's length and the number of initial states left out of averages.
        center: (d,) the point ``c`` used for second moments (the optimum when known, else 0).
        momentum: (R, d) the final momentum average ``mu`` (SGD with momentum_horizon > 1), e.g. to
            continue a run with ``init=final, init_momentum=momentum``.
    """

    final: torch.Tensor
    steps: int
    burn_in: int
    center: torch.Tensor
    mean: torch.Tensor | None = None
    second_moment: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    excess_loss: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    fdr_lhs: torch.Tensor | None = None
    observables: dict[str, torch.Tensor] = field(default_factory=dict)
    trajectory: torch.Tensor | None = None
    record_steps: torch.Tensor | None = None
    times: torch.Tensor | None = None
    momentum: torch.Tensor | None = None

    @property
    def chains(self) -> int:
        return int(self.final.shape[0])

    @property
    def variance(self) -> torch.Tensor:
        """(R, d) time average of ``(Phi_i - c_i)^2`` per coordinate."""
        if self.second_moment is None:
            raise ValueError("statistics were not collected (statistics=False)")
        return torch.diagonal(self.second_moment, dim1=-2, dim2=-1)


class _Accumulator:
    """Running sums of per-chain statistics (sums, divided once at the end)."""

    def __init__(self, problem, center: torch.Tensor, observables, with_grad: bool) -> None:
        self.problem = problem
        self.center = center
        self.observables: dict[str, Callable] = dict(observables or {})
        self.with_grad = with_grad
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, key: str, value: torch.Tensor) -> None:
        if key in self.sums:
            self.sums[key].add_(value)
        else:
            self.sums[key] = value.clone()

    def add(self, phi: torch.Tensor, g_hat: torch.Tensor | None) -> None:
        e = phi - self.center
        self._add("mean", phi)
        self._add("second_moment", e.unsqueeze(-1) * e.unsqueeze(-2))
        self._add("loss", self.problem.loss(phi))
        if g_hat is not None:
            self._add("grad_sq", (g_hat * g_hat).sum(-1))
            self._add("fdr_lhs", (e * g_hat).sum(-1))
        for name, fn in self.observables.items():
            self._add("obs:" + name, torch.as_tensor(fn(phi), dtype=phi.dtype))
        self.count += 1

    def fill(self, result: ChainResult) -> ChainResult:
        if self.count == 0:
            return result
        k = float(self.count)
        avg = {key: v / k for key, v in self.sums.items()}
        result.mean = avg["mean"]
        result.second_moment = avg["second_moment"]
        result.loss = avg["loss"]
        if self.problem.min_loss is not None:
            result.excess_loss = avg["loss"] - self.problem.min_loss
        result.grad_sq = avg.get("grad_sq")
        result.fdr_lhs = avg.get("fdr_lhs")
        result.observables = {key[4:]: v for key, v in avg.items() if key.startswith("obs:")}
        return result
