r"""Learning-rate and batch-size schedules, usable with torch's LR-scheduler machinery.

A schedule is an object with ``schedule(t) -> float``, the learning rate at step
``t = 0, 1, 2, ...``, and a ``base`` rate; ``attach(optimizer, schedule)`` returns a
``torch.optim.lr_scheduler.LRScheduler`` that applies its shape to every param group.

* :class:`RobbinsMonro`: :math:`\eta_0(1+t/\tau)^{-\gamma}` with the classical conditions
  (Robbins & Monro 1951; Bertsekas & Tsitsiklis Prop. 3.5) and exact partial sums
  :math:`\sum_{t<T}\eta_t` (the lecture's "time"); constant and :math:`c\,s^{-\gamma}` forms.
* :class:`StepDrops`: divide by ``factor`` at milestones (He et al. 2016 divide by 10).
* :class:`Cosine`, :class:`CyclicCosine`: SGDR (Loshchilov & Hutter 2017) and snapshot
  ensembles (Huang et al. 2017).
* :class:`Warmup`: linear warmup before any schedule (Goyal et al. 2017).
* :class:`BatchSizeRamp`: grow the batch size instead of decaying the rate (Smith et al. 2018).

>>> import torch
>>> from sgdlab.schedules import RobbinsMonro, attach
>>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
>>> sched = attach(opt, RobbinsMonro(0.5, tau=10, gamma=1.0))
>>> opt.step(); sched.step()
>>> round(opt.param_groups[0]["lr"], 12)  # 0.5 / (1 + 1/10)
0.454545454545
"""

from __future__ import annotations

from .base import Schedule, check_step
from .batch_ramp import BatchSizeRamp
from .cosine import Cosine, CyclicCosine
from .lr_scheduler import ScheduleLR, attach
from .robbins_monro import Conditions, RobbinsMonro
from .step_drops import StepDrops
from .warmup import Warmup

__all__ = [
    "BatchSizeRamp",
    "Conditions",
    "Cosine",
    "CyclicCosine",
    "RobbinsMonro",
    "Schedule",
    "ScheduleLR",
    "StepDrops",
    "Warmup",
    "attach",
    "check_step",
]
