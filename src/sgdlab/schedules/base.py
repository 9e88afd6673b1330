r"""The schedule protocol: ``schedule(t)`` is the learning rate at step ``t = 0, 1, 2, ...``.

A :class:`Schedule` has a positive ``base`` learning rate (the reference value its shape is
measured against: the peak of a cosine, :math:`\eta_0` of Robbins-Monro) and the value at
each step.  The lecture's "time" is the sum of learning rates, :math:`s_T = \sum_{t<T}\eta_t`
(gradient flow and Langevin dynamics run on this clock), given by :meth:`Schedule.partial_sum`
and, as a grid, :meth:`Schedule.times`.

Driving a torch optimizer: :meth:`Schedule.attach` (see :mod:`sgdlab.schedules.lr_scheduler`).
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

__all__ = ["Schedule", "check_step", "check_step_count"]


def check_step(name: str, value: Any) -> int:
    """A schedule step: an integer ``t >= 0`` (bools rejected)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer step >= 0, got {value!r}")
    try:
        t = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer step >= 0, got {value!r}") from None
    if t < 0:
        raise ValueError(f"{name} must be an integer step >= 0, got {value!r}")
    return t


def check_step_count(name: str, value: Any) -> int:
    """A number of steps that must be at least one: an integer ``>= 1``."""
    t = -1 if isinstance(value, bool) else None
    if t is None:
        try:
            t = operator.index(value)
        except TypeError:
            t = -1
    if t < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return t


class Schedule(ABC):
    """Base class of learning-rate schedules.

    Subclasses set ``self.base`` (> 0) and implement :meth:`lr` for a validated step; calling
    the schedule validates ``t`` and returns a Python float.
    """

    base: float

    @abstractmethod
    def lr(self, t: int) -> float:
        """The learning rate at step ``t`` (``t`` already validated)."""

    def __call__(self, t: int) -> float:
        return float(self.lr(check_step("t", t)))

    def shape(self, t: int) -> float:
        """The shape ``schedule(t) / base``, what multiplies a param group's own lr (a method
        of its own name: ``StepDrops`` and ``BatchSizeRamp`` have a ``factor`` attribute)."""
        return self(t) / self.base

    def values(self, steps: int) -> np.ndarray:
        """The learning rates at ``t = 0 .. steps-1`` as a float64 array."""
        steps = check_step("steps", steps)
        return np.array([self.lr(t) for t in range(steps)], dtype=np.float64)

    def partial_sum(self, steps: int | float, power: float = 1.0) -> float:
        r""":math:`\sum_{t < T} \eta_t^p` with ``T = steps`` and ``p = power``.

        With ``power=1`` this is the lecture's time :math:`s_T`; ``power=2`` gives the noise
        budget :math:`\sum\eta_t^2`.  Summed exactly (``math.fsum``) here; schedules with a
        closed form override it.  ``steps=math.inf`` is only supported where overridden.
        """
        if steps == math.inf:
            raise ValueError(
                f"steps must be a finite integer >= 0 for {type(self).__name__}, got inf"
            )
        steps = check_step("steps", steps)
        p = float(power)
        return math.fsum(self.lr(t) ** p for t in range(steps))

    def times(self, steps: int) -> np.ndarray:
        r"""The time grid :math:`s_0 = 0, s_1, \dots, s_T` (length ``steps + 1``).

        :math:`s_k = \sum_{t<k}\eta_t` (float64 cumulative sum); useful to plot SGD runs
        against gradient-flow time.  :meth:`partial_sum` gives one :math:`s_T` exactly.
        """
        steps = check_step("steps", steps)
        return np.concatenate([[0.0], np.cumsum(self.values(steps))])
