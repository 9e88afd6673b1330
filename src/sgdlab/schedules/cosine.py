r"""Cosine annealing and cyclic cosine with warm restarts (snapshot ensembles).

Cosine annealing (Loshchilov & Hutter 2017, "SGDR: Stochastic gradient descent with warm
restarts", eq. 5) over :math:`T` steps:

.. math::
    \eta_t = \eta_{\min} + \tfrac12(\eta_{\max} - \eta_{\min})\bigl(1 + \cos(\pi t / T)\bigr),
    \qquad 0 \le t \le T,

the closed form that ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T)`` approximates
recursively.  After :math:`T` the rate stays at :math:`\eta_{\min}` (torch's closed form keeps
following the cosine back up; annealing "to the end of training" is what the paper means).

Cyclic cosine restarts the annealing: cycle :math:`i` lasts :math:`T_i = T_0 m^i` steps
(``cycle_mult`` :math:`m`), inside it :math:`t_{cur}` runs over :math:`0..T_i-1` and
:math:`\eta = \eta_{\min} + \frac12(\eta_{\max}-\eta_{\min})(1 + \cos(\pi t_{cur}/T_i))`
(SGDR; torch's ``CosineAnnealingWarmRestarts``).  Snapshot ensembles (Huang et al. 2017,
"Snapshot ensembles: train 1, get M for free", eq. 2) use :math:`m = 1`,
:math:`T_0 = \lceil T/M \rceil` and save the model at the last step of each cycle, where the rate
is smallest: :meth:`CyclicCosine.snapshot_steps`.

Example::

    >>> from sgdlab.schedules import CyclicCosine
    >>> s = CyclicCosine.snapshot_ensemble(0.2, total_steps=300, snapshots=3)
    >>> s.snapshot_steps(300)
    [99, 199, 299]
    >>> s(100) == s.base
    True
"""

from __future__ import annotations

import math

from .._validation import check_nonnegative, check_positive
from .base import Schedule, check_step, check_step_count

__all__ = ["Cosine", "CyclicCosine"]


def _cosine(base: float, eta_min: float, t_cur: float, T: float) -> float:
    return eta_min + (base - eta_min) * (1.0 + math.cos(math.pi * t_cur / T)) / 2.0


def _check_floor(base: float, eta_min: float) -> float:
    eta_min = check_nonnegative("eta_min", eta_min)
    if eta_min > base:
        raise ValueError(f"eta_min must satisfy 0 <= eta_min <= base = {base!r}, got {eta_min!r}")
    return eta_min


class Cosine(Schedule):
    r"""Cosine annealing from ``base`` at ``t = 0`` to ``eta_min`` at ``t = total_steps``.

    Args:
        base: :math:`\eta_{\max}` (> 0).
        total_steps: :math:`T` (integer >= 1); the rate is ``eta_min`` for ``t >= T``.
        eta_min: the floor :math:`0 \le \eta_{\min} \le \eta_{\max}`.
    """

    def __init__(self, base: float, total_steps: int, eta_min: float = 0.0) -> None:
        self.base = check_positive("base", base)
        self.total_steps = check_step_count("total_steps", total_steps)
        self.eta_min = _check_floor(self.base, eta_min)

    def lr(self, t: int) -> float:
        if t >= self.total_steps:
            return self.eta_min
        return _cosine(self.base, self.eta_min, t, self.total_steps)

    def __repr__(self) -> str:
        return (
            f"Cosine(base={self.base!r}, total_steps={self.total_steps!r}, "
            f"eta_min={self.eta_min!r})"
        )


class CyclicCosine(Schedule):
    r"""Cosine annealing with warm restarts (SGDR): cycles of :math:`T_i = T_0 m^i` steps.

    Args:
        base: :math:`\eta_{\max}`, the rate at the start of every cycle (> 0).
        cycle_steps: :math:`T_0`, the length of the first cycle (integer >= 1).
        cycle_mult: :math:`m`, integer >= 1 growth of the cycle length after each restart.
        eta_min: the floor the cosine aims at (reached only in the limit of a long cycle).
    """

    def __init__(
        self, base: float, cycle_steps: int, cycle_mult: int = 1, eta_min: float = 0.0
    ) -> None:
        self.base = check_positive("base", base)
        self.cycle_steps = check_step_count("cycle_steps", cycle_steps)
        self.cycle_mult = check_step_count("cycle_mult", cycle_mult)
        self.eta_min = _check_floor(self.base, eta_min)

    @classmethod
    def snapshot_ensemble(cls, base: float, total_steps: int, snapshots: int) -> CyclicCosine:
        r"""Huang et al. 2017: ``snapshots`` (M) equal cycles of :math:`\lceil T/M\rceil` steps
        (their eq. 2). Where M does not divide T the cycles that end within T number
        :math:`\lfloor T / \lceil T/M\rceil\rfloor < M`, and so do the entries of
        :meth:`snapshot_steps` (T = 300, M = 7: six; T = 61, M = 60: thirty). Choose T a
        multiple of M for M snapshots."""
        T = check_step_count("total_steps", total_steps)
        M = check_step_count("snapshots", snapshots)
        if M > T:
            raise ValueError(f"snapshots must be <= total_steps = {T}, got {snapshots!r}")
        return cls(base, cycle_steps=-(-T // M), cycle_mult=1, eta_min=0.0)

    def cycle_position(self, t: int) -> tuple[int, int, int]:
        """``(cycle index i, t_cur, T_i)`` of step ``t``."""
        t = check_step("t", t)
        if self.cycle_mult == 1:
            return t // self.cycle_steps, t % self.cycle_steps, self.cycle_steps
        i, start, length = 0, 0, self.cycle_steps
        while t >= start + length:
            start += length
            length *= self.cycle_mult
            i += 1
        return i, t - start, length

    def lr(self, t: int) -> float:
        _, t_cur, length = self.cycle_position(t)
        return _cosine(self.base, self.eta_min, t_cur, length)

    def cycle_ends(self, total_steps: int) -> list[int]:
        """The last step of every cycle that is complete within ``total_steps`` steps."""
        T = check_step("total_steps", total_steps)
        ends, end, length = [], 0, self.cycle_steps
        while end + length <= T:
            end += length
            ends.append(end - 1)
            length *= self.cycle_mult
        return ends

    def snapshot_steps(self, total_steps: int) -> list[int]:
        """Steps after whose update a snapshot is saved: the end of each complete cycle.

        There the rate is the smallest of its cycle; the next step restarts at ``base``.
        """
        return self.cycle_ends(total_steps)

    def __repr__(self) -> str:
        return (
            f"CyclicCosine(base={self.base!r}, cycle_steps={self.cycle_steps!r}, "
            f"cycle_mult={self.cycle_mult!r}, eta_min={self.eta_min!r})"
        )
