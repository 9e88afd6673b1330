r"""Running averages: weight 1/N (EMA), the lecture's 1/min(N, t), Adam's debiasing, exact mean.

All four are :math:`\hat\mu_t = (1-w_t)\hat\mu_{t-1} + w_t x_t` from :math:`\hat\mu_0 = 0`:

* :mod:`~sgdlab.averages.weights`: the scalar weights (cheap, for optimizers) and the weights
  :math:`a_{t,s}` each past sample carries, also when the horizon changes between steps.
* :mod:`~sgdlab.averages.running`: :class:`RunningAverage`, the recursion on tensors.
* :mod:`~sgdlab.averages.closed_forms`: means and variances on i.i.d. samples, and the
  (2N-1)-window equivalence of the EMA (the lecture's erratum 4).

References: the lecture (TTIC 31230 "Stochastic Gradient Descent", slides on running averages
and bias correction); Kingma & Ba 2015, "Adam", Algorithm 1 and Section 3.

>>> import torch
>>> from sgdlab.averages import RunningAverage, adam_variance
>>> avg = RunningAverage("adam", horizon=20)
>>> avg.update(torch.tensor([4.0])).tolist()  # Adam's correction: the first sample exactly
[4.0]
>>> round(adam_variance(t=20, N=20), 6)
0.054298
"""

from __future__ import annotations

from .closed_forms import (
    adam_variance,
    ema_mean_factor,
    ema_mean_lag,
    ema_stationary_variance,
    ema_variance,
    equivalent_window,
    lecture_variance,
    mean_factor,
    mean_variance,
    variance,
    window_mean_lag,
    window_variance,
)
from .running import RunningAverage
from .weights import (
    KINDS,
    check_step,
    debias_factor,
    ema_mass,
    lecture_count,
    sample_weights,
    weight,
)

__all__ = [
    "KINDS",
    "RunningAverage",
    "adam_variance",
    "check_step",
    "debias_factor",
    "ema_mass",
    "ema_mean_factor",
    "ema_mean_lag",
    "ema_stationary_variance",
    "ema_variance",
    "equivalent_window",
    "lecture_count",
    "lecture_variance",
    "mean_factor",
    "mean_variance",
    "sample_weights",
    "variance",
    "weight",
    "window_mean_lag",
    "window_variance",
]
