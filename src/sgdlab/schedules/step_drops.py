r"""Step drops: divide the learning rate by ``factor`` at each milestone.

.. math::
    \eta_t = \eta_0 / k^{n(t)}, \qquad n(t) = \#\{m_i \le t\},

the schedule of He et al. 2016 ("Deep residual learning for image recognition", ImageNet:
start at 0.1, divide by 10 when the error plateaus; CIFAR-10: divide by 10 at 32k and 48k
iterations).  The lecture's slide says the ResNet plots reduce the rate twice by a factor of 2;
the paper divides by 10 (erratum 7 of REFERENCE.md), hence the default ``factor=10``.

Equal to ``torch.optim.lr_scheduler.MultiStepLR(milestones, gamma=1/factor)``.

Example::

    >>> from sgdlab.schedules import StepDrops
    >>> s = StepDrops(0.1, milestones=[3, 5])
    >>> [s(t) for t in range(6)]
    [0.1, 0.1, 0.1, 0.01, 0.01, 0.001]
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

from .._validation import check_finite, check_positive
from .base import Schedule, check_step, check_step_count

__all__ = ["StepDrops", "check_milestones"]


def check_milestones(name: str, milestones: Iterable[int]) -> tuple[int, ...]:
    """Strictly increasing integer steps ``>= 1``."""
    try:
        ms = tuple(milestones)
    except TypeError:
        raise ValueError(
            f"{name} must be an iterable of increasing integer steps >= 1, got {milestones!r}"
        ) from None
    out = tuple(check_step_count(f"{name}[{i}]", m) for i, m in enumerate(ms))
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {list(ms)!r}")
    return out


class StepDrops(Schedule):
    r""":math:`\eta_t = \eta_0 / k^{n(t)}` with :math:`n(t)` the number of milestones :math:`\le t`.

    Args:
        base: :math:`\eta_0` (> 0).
        milestones: strictly increasing steps ``>= 1`` at which the rate drops (the rate at a
            milestone step is already the dropped one, as in torch's MultiStepLR).
        factor: :math:`k > 1`, the divisor at each drop (He et al.: 10).
    """

    def __init__(self, base: float, milestones: Iterable[int], factor: float = 10.0) -> None:
        self.base = check_positive("base", base)
        self.milestones = check_milestones("milestones", milestones)
        k = check_finite("factor", factor)
        if k <= 1.0:
            raise ValueError(f"factor must be a finite divisor > 1, got {factor!r}")
        self.factor = k

    def drops(self, t: int) -> int:
        """How many milestones are ``<= t``."""
        return bisect.bisect_right(self.milestones, check_step("t", t))

    def lr(self, t: int) -> float:
        return self.base / self.factor ** bisect.bisect_right(self.milestones, t)

    def partial_sum(self, steps: int | float, power: float = 1.0) -> float:
        r"""Closed form :math:`\sum_{t<T}\eta_t^p = \sum_i (\text{segment}_i\ \text{length})\,
        (\eta_0/k^i)^p`; ``steps=math.inf`` is ``inf``."""
        p = check_positive("power", power)
        if steps == math.inf:
            return math.inf
        T = check_step("steps", steps)
        edges = [0, *(m for m in self.milestones if m < T), T]
        return math.fsum(
            (b - a) * (self.base / self.factor**i) ** p
            for i, (a, b) in enumerate(zip(edges, edges[1:]))
        )

    def __repr__(self) -> str:
        ms = list(self.milestones)
        return f"StepDrops(base={self.base!r}, milestones={ms!r}, factor={self.factor!r})"
