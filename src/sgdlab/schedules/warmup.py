r"""Linear warmup in front of any schedule (Goyal et al. 2017).

Goyal et al. 2017 ("Accurate, large minibatch SGD: training ImageNet in 1 hour", Section 2.2)
scale the learning rate linearly with the batch size (:math:`B \to kB` gives
:math:`\eta \to k\eta`) and reach the large rate by a *gradual warmup*: start at
:math:`\eta` (the small-batch rate) and raise it by a constant amount each step until
:math:`k\eta` after 5 epochs.  For a schedule :math:`\eta^{\rm inner}_t` and ``steps`` :math:`W`:

.. math::
    \eta_t = \eta^{\rm inner}_{W}\,\Bigl(f_0 + (1 - f_0)\,\frac{t}{W}\Bigr) \quad (t < W),
    \qquad \eta_t = \eta^{\rm inner}_t \quad (t \ge W),

continuous at :math:`t = W`.  With ``shift=True`` the inner schedule starts after the warmup
(:math:`\eta_t = \eta^{\rm inner}_{t-W}`, ramp towards :math:`\eta^{\rm inner}_0`).  Goyal's
rule is ``start_factor = 1/k`` (:meth:`Warmup.linear_scaling`).  On a constant schedule this is
``torch.optim.lr_scheduler.LinearLR(start_factor=f0, total_iters=W)``.

Example::

    >>> from sgdlab.schedules import StepDrops, Warmup
    >>> s = Warmup.linear_scaling(StepDrops(0.8, [30]), steps=4, batch_ratio=8)  # 0.1 -> 0.8
    >>> [round(s(t), 3) for t in (0, 2, 4, 29, 30)]
    [0.1, 0.45, 0.8, 0.8, 0.08]
"""

from __future__ import annotations

from .._validation import check_finite, check_positive
from .base import Schedule, check_step_count

__all__ = ["Warmup"]


class Warmup(Schedule):
    r"""Linear warmup over ``steps`` steps, then ``schedule``.

    Args:
        schedule: the schedule after warmup; ``base`` is taken from it.
        steps: :math:`W`, the warmup length (integer >= 1).
        start_factor: :math:`f_0 \in (0, 1]`, the rate at ``t = 0`` relative to the target
            (default 1/3 as torch's LinearLR; Goyal et al. use :math:`1/k`).  Zero is refused:
            a zero step wastes a step and breaks multiplicative chaining of schedulers.
        shift: start ``schedule`` at its own step 0 after the warmup instead of at step ``W``.
    """

    def __init__(
        self, schedule: Schedule, steps: int, start_factor: float = 1.0 / 3.0, shift: bool = False
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a sgdlab Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.steps = check_step_count("steps", steps)
        f0 = check_finite("start_factor", start_factor)
        if not 0.0 < f0 <= 1.0:
            raise ValueError(
                f"start_factor must satisfy 0 < start_factor <= 1, got {start_factor!r}"
            )
        self.start_factor = f0
        self.shift = bool(shift)
        self.base = schedule.base

    @classmethod
    def linear_scaling(cls, schedule: Schedule, steps: int, batch_ratio: float) -> Warmup:
        r"""Goyal et al.: start at :math:`1/k` of the target, :math:`k` = ``batch_ratio``."""
        k = check_positive("batch_ratio", batch_ratio)
        if k < 1.0:
            raise ValueError(f"batch_ratio must be >= 1 (large batch / small batch), got {k!r}")
        return cls(schedule, steps, start_factor=1.0 / k)

    def target(self) -> float:
        """The rate the ramp reaches at ``t = steps``."""
        return self.schedule(0 if self.shift else self.steps)

    def lr(self, t: int) -> float:
        W = self.steps
        if t >= W:
            return self.schedule(t - W if self.shift else t)
        f0 = self.start_factor
        return self.target() * (f0 + (1.0 - f0) * t / W)

    def __repr__(self) -> str:
        return (
            f"Warmup({self.schedule!r}, steps={self.steps!r}, "
            f"start_factor={self.start_factor!r}, shift={self.shift!r})"
        )
