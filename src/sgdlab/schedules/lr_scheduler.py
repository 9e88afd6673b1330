r"""Drive a torch optimizer with a schedule: :class:`ScheduleLR` and :func:`attach`.

``ScheduleLR`` is a ``torch.optim.lr_scheduler.LRScheduler``.  Each param group keeps its own
initial rate :math:`\eta^{(g)}_0` (``group["initial_lr"]``) and the schedule supplies the
shape: after ``k`` calls of ``scheduler.step()``

.. math::
    \texttt{group["lr"]} = \eta^{(g)}_0 \cdot \texttt{schedule}(k) / \texttt{schedule.base},

so a group whose lr equals ``schedule.base`` follows the schedule exactly, and groups with other
rates (e.g. a smaller rate for a pretrained backbone) follow the same shape scaled to theirs.
The schedule's step 0 is applied when the scheduler is built, as for every torch scheduler.

Two modes:

* closed form (default): the lr is recomputed from ``initial_lr`` at each step, so the
  scheduler owns the lr (like ``LambdaLR``).  It also provides ``_get_closed_form_lr`` so
  ``SequentialLR`` can hand over to it at a milestone (it restarts at the schedule's step 0).
* ``chainable=True``: each step multiplies the current lr by
  :math:`\texttt{schedule}(k)/\texttt{schedule}(k-1)` (and by ``schedule(0)/base`` at
  construction), so it composes multiplicatively with other schedulers in
  ``torch.optim.lr_scheduler.ChainedScheduler``.  A schedule value of 0 makes the next
  ratio undefined and raises ``ValueError``.

Example::

    >>> import torch
    >>> from sgdlab.schedules import Cosine, attach
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> opt = torch.optim.SGD([p], lr=0.1)
    >>> sched = attach(opt, Cosine(0.1, total_steps=10))
    >>> for _ in range(5):
    ...     opt.step()
    ...     sched.step()
    >>> round(opt.param_groups[0]["lr"], 12)  # Cosine(5) = 0.1 * (1 + cos(pi/2)) / 2
    0.05
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .base import Schedule

__all__ = ["ScheduleLR", "attach"]


class ScheduleLR(LRScheduler):
    """A torch LR scheduler following a sgdlab :class:`~sgdlab.schedules.base.Schedule`.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        schedule: the schedule (its ``base`` must be > 0).
        chainable: multiplicative (chainable) updates instead of the closed form.
        last_epoch: as in torch (``-1`` for a fresh run).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Schedule,
        *,
        chainable: bool = False,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a sgdlab Schedule, got {type(schedule).__name__}")
        if not schedule.base > 0:
            raise ValueError(f"schedule.base must be > 0, got {schedule.base!r}")
        self.schedule = schedule
        self.chainable = bool(chainable)
        super().__init__(optimizer, last_epoch)

    def _factor(self, t: int) -> float:
        return self.schedule.shape(t)

    def get_lr(self) -> list[Any]:
        t = self.last_epoch
        if not self.chainable:
            return self._get_closed_form_lr()
        groups = self.optimizer.param_groups
        if t == 0:
            ratio = self._factor(0)
        elif self._is_initial:  # resumed with last_epoch >= 0: the lr is already in place
            return [group["lr"] for group in groups]
        else:
            previous = self.schedule(t - 1)
            if previous == 0.0:
                raise ValueError(
                    f"chainable=True needs schedule values > 0, got schedule({t - 1}) = 0; "
                    "use the closed form (chainable=False) or a schedule that stays positive"
                )
            ratio = self.schedule(t) / previous
        return [group["lr"] * ratio for group in groups]

    def _get_closed_form_lr(self) -> list[Any]:
        f = self._factor(self.last_epoch)
        return [base_lr * f for base_lr in self.base_lrs]


def attach(optimizer: Optimizer, schedule: Schedule, *, chainable: bool = False) -> ScheduleLR:
    """Return a :class:`ScheduleLR` driving ``optimizer`` with ``schedule``.

    Call ``scheduler.step()`` after each ``optimizer.step()``; the lr used by the ``k``-th
    optimizer step (``k = 0, 1, ...``) is then ``initial_lr * schedule(k) / schedule.base`` in
    every param group.
    """
    return ScheduleLR(optimizer, schedule, chainable=chainable)
