r"""Grow the batch size instead of decaying the learning rate (Smith et al. 2018).

Smith, Kindermans, Ying & Le 2018 ("Don't decay the learning rate, increase the batch size")
observe that SGD's noise scale :math:`g = \epsilon N / (B(1-m))` depends on the learning rate
:math:`\epsilon` and the batch size :math:`B` through :math:`\epsilon/B`: dividing
:math:`\epsilon` by :math:`k` or multiplying :math:`B` by :math:`k` at a milestone gives the same
noise schedule, with :math:`k` times fewer parameter updates afterwards.  When :math:`B` reaches
a maximum (memory, or the onset of the large-batch regime) the remaining drops go back into the
learning rate.

With :math:`n(t)` milestones passed, factor :math:`k` and the step-drop schedule it replaces,
:math:`\eta^{\rm drop}_t = \eta_0/k^{n(t)}` at fixed :math:`B_0`:

.. math::
    B_t = \min\bigl(\operatorname{round}(B_0 k^{n(t)}),\ B_{\max}\bigr), \qquad
    \eta_t = \eta_0\,\frac{B_t}{B_0 k^{n(t)}},

so :math:`\eta_t / B_t = \eta^{\rm drop}_t / B_0` at every step (:meth:`BatchSizeRamp.noise_scale`)
and :math:`\eta_t = \eta_0` while the batch can still grow.

Which rate to give which optimizer:

* a plain ``torch.optim`` optimizer (or an sgdlab one whose ``scaling`` leaves the rate alone):
  attach the ramp itself, ``attach(opt, ramp)``, and feed batches of ``ramp.batch_size(t)``;
* an sgdlab optimizer under the linear rule (``scaling="linear"``/``"lecture"`` without
  momentum, rate tuned at ``ref_batch_size = B0``): it already multiplies its rate by
  :math:`B_t/B_0`, so attach :meth:`equivalent_lr_schedule` and call
  ``opt.set_batch_size(ramp.batch_size(t))`` before each step; the step it takes uses
  :math:`\eta_0/k^{n}\cdot B_t/B_0 = \eta_t`.

Example::

    >>> from sgdlab.schedules import BatchSizeRamp
    >>> r = BatchSizeRamp(0.1, batch_size=128, milestones=[100, 200, 300], factor=5,
    ...                   max_batch_size=5000)
    >>> [r.batch_size(t) for t in (0, 100, 200, 300)]
    [128, 640, 3200, 5000]
    >>> [round(r(t), 6) for t in (0, 200, 300)]
    [0.1, 0.1, 0.03125]
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

from .._validation import check_batch_size, check_finite, check_positive
from .base import Schedule, check_step
from .step_drops import StepDrops, check_milestones

__all__ = ["BatchSizeRamp"]


class BatchSizeRamp(Schedule):
    r"""Batch sizes :math:`B_t` and learning rates :math:`\eta_t` replacing step drops.

    Args:
        base: :math:`\eta_0`, the learning rate at batch size ``batch_size`` (> 0).
        batch_size: :math:`B_0`, the initial batch size (integer >= 1).
        milestones: strictly increasing steps ``>= 1`` where the noise scale drops by ``factor``.
        factor: :math:`k > 1` (Smith et al.: 5).
        max_batch_size: :math:`B_{\max} \ge B_0` (``None``: no cap).
    """

    def __init__(
        self,
        base: float,
        batch_size: int,
        milestones: Iterable[int],
        factor: float = 5.0,
        max_batch_size: int | None = None,
    ) -> None:
        self.base = check_positive("base", base)
        self.initial_batch_size = check_batch_size("batch_size", batch_size)
        self.milestones = check_milestones("milestones", milestones)
        k = check_finite("factor", factor)
        if k <= 1.0:
            raise ValueError(f"factor must be a finite growth factor > 1, got {factor!r}")
        self.factor = k
        if max_batch_size is None:
            self.max_batch_size: int | None = None
        else:
            bmax = check_batch_size("max_batch_size", max_batch_size)
            if bmax < self.initial_batch_size:
                raise ValueError(
                    f"max_batch_size must be >= batch_size = {self.initial_batch_size}, "
                    f"got {max_batch_size!r}"
                )
            self.max_batch_size = bmax

    def drops(self, t: int) -> int:
        """:math:`n(t)`, the number of milestones ``<= t``."""
        return bisect.bisect_right(self.milestones, check_step("t", t))

    def _batch(self, n: int) -> int:
        b = round(self.initial_batch_size * self.factor**n)
        return b if self.max_batch_size is None else min(b, self.max_batch_size)

    def batch_size(self, t: int) -> int:
        r""":math:`B_t = \min(\operatorname{round}(B_0 k^{n(t)}), B_{\max})`."""
        return self._batch(self.drops(t))

    def lr(self, t: int) -> float:
        n = bisect.bisect_right(self.milestones, t)
        return self.base * self._batch(n) / (self.initial_batch_size * self.factor**n)

    def noise_scale(self, t: int) -> float:
        r""":math:`\eta_t/B_t = \eta_0/(B_0 k^{n(t)})`: the same as the step-drop schedule's."""
        return self(t) / self.batch_size(t)

    def equivalent_lr_schedule(self) -> StepDrops:
        r"""Step drops :math:`\eta_0/k^{n(t)}` at fixed :math:`B_0`: the same noise scale."""
        return StepDrops(self.base, self.milestones, factor=self.factor)

    def examples(self, steps: int) -> int:
        r""":math:`\sum_{t<T} B_t`, the examples processed by the first ``steps`` updates."""
        T = check_step("steps", steps)
        edges = [0, *(m for m in self.milestones if m < T), T]
        return sum((b - a) * self._batch(i) for i, (a, b) in enumerate(zip(edges, edges[1:])))

    def steps_for_examples(self, examples: int) -> int:
        """The fewest updates whose batches add up to at least ``examples`` examples."""
        E = check_step("examples", examples)
        t, seen = 0, 0
        bounds = [*self.milestones, math.inf]
        for n, end in enumerate(bounds):
            b = self._batch(n)
            room = (end - t) * b
            if seen + room >= E:
                return t + -(-(E - seen) // b)
            seen += int(room)
            t = int(end)
        raise AssertionError("unreachable: the last segment is unbounded")

    def __repr__(self) -> str:
        return (
            f"BatchSizeRamp(base={self.base!r}, batch_size={self.initial_batch_size!r}, "
            f"milestones={list(self.milestones)!r}, factor={self.factor!r}, "
            f"max_batch_size={self.max_batch_size!r})"
        )
