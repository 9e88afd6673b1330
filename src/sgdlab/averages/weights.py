r"""Weights of the four running averages, as scalar functions.

Every running average here is the recursion

.. math::
    \hat\mu_0 = 0, \qquad \hat\mu_t = (1 - w_t)\,\hat\mu_{t-1} + w_t\, x_t, \qquad t \ge 1,

and the four kinds differ only in the weight :math:`w_t` (horizon :math:`N \ge 1` in steps,
:math:`\beta = 1 - 1/N`):

============  ==========================================  ======================================
kind          :math:`w_t` (constant :math:`N`)            what :math:`\hat\mu_t` is
============  ==========================================  ======================================
``"ema"``     :math:`1/N`                                 EMA biased towards 0 early:
                                                          :math:`E\hat\mu_t = (1-\beta^t)\mu`
``"lecture"`` :math:`1/\min(N, t)`                        exact mean of :math:`x_1..x_t` for
                                                          :math:`t \le N`, then the EMA
``"adam"``    :math:`(1-\beta)/(1-\beta^t)`               Adam's :math:`m_t/(1-\beta^t)`
``"mean"``    :math:`1/t`                                 exact mean of :math:`x_1..x_t`
============  ==========================================  ======================================

The ``"adam"`` row is Adam's bias correction (Kingma & Ba 2015, Algorithm 1) written as a
recursion: with :math:`m_t = \beta m_{t-1} + (1-\beta) x_t` and :math:`c_t = 1-\beta^t`,
:math:`m_t/c_t = (\beta c_{t-1}/c_t)\, m_{t-1}/c_{t-1} + ((1-\beta)/c_t)\, x_t`, and
:math:`\beta c_{t-1} + 1 - \beta = c_t`, so the two weights sum to one.  The ``"lecture"``
row is the lecture's "1/min(N, t)" correction (TTIC 31230, slide "Bias correction of running
averages").

Horizon changing between steps
------------------------------
When the batch size changes, the horizon in steps changes with it, so each step may use its
own :math:`N_t`.  The weights then generalise through two scalar states, both exact for a
constant :math:`N`:

* ``"ema"``: :math:`w_t = 1/N_t`; its data mass
  :math:`c_t = (1 - 1/N_t) c_{t-1} + 1/N_t = 1 - \prod_{s\le t}(1 - 1/N_s)` is the total weight
  the estimate puts on data, :math:`E\hat\mu_t = c_t \mu` (see :func:`ema_mass`).
* ``"adam"``: :math:`w_t = (1/N_t)/c_t` with that same mass, i.e. Adam's :math:`m_t/c_t`
  where the correction divides by the mass actually accumulated (not :math:`1-\beta_t^t`,
  which is wrong once :math:`\beta` has changed).  The weights on past samples sum to one,
  so the estimate stays unbiased.
* ``"lecture"``: :math:`w_t = 1/n_t` with the effective count
  :math:`n_t = \min(N_t, n_{t-1} + 1)`, :math:`n_0 = 0` (see :func:`lecture_count`): the
  estimate is treated as the mean of :math:`n_{t-1}` samples, one more is added, and the count
  is capped at the current horizon.  For a constant :math:`N` this is :math:`\min(N, t)`; when
  the horizon grows the window grows one sample per step instead of jumping.
* ``"mean"``: :math:`w_t = 1/t`, no horizon.

In every case the estimate is :math:`\hat\mu_t = \sum_{s\le t} a_{t,s} x_s` with
:math:`a_{t,s} = w_s \prod_{s<r\le t} (1 - w_r)` (see :func:`sample_weights`).

Example::

    >>> from sgdlab.averages import weight
    >>> weight("lecture", 3, 10), weight("lecture", 30, 10)
    (0.3333333333333333, 0.1)
    >>> round(weight("adam", 1, 20), 12)
    1.0
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._validation import check_choice, check_horizon

__all__ = [
    "KINDS",
    "check_step",
    "weight",
    "debias_factor",
    "ema_mass",
    "lecture_count",
    "sample_weights",
]

#: The running-average kinds, in the order of the module table.
KINDS: tuple[str, ...] = ("ema", "lecture", "adam", "mean")


def check_step(name: str, value: Any) -> int:
    """A step index of a running average: an integer ``t >= 1``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer step >= 1, got {value!r}")
    try:
        t = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer step >= 1, got {value!r}") from None
    if t < 1:
        raise ValueError(f"{name} must be an integer step >= 1, got {value!r}")
    return t


def debias_factor(t: int, N: float) -> float:
    r"""Adam's correction :math:`1 - (1 - 1/N)^t`: the EMA's data mass after ``t`` steps.

    Equal to :math:`E\hat\mu_t/\mu` for the ``"ema"`` kind started at :math:`\hat\mu_0 = 0`
    (so :math:`E\hat\mu_1 = \mu/N`, and :math:`\approx (t/N)\mu` for :math:`t \ll N`).
    Computed as ``-expm1(t * log1p(-1/N))`` so it stays accurate for large ``N``.
    """
    t = check_step("t", t)
    N = check_horizon("N", N)
    if N == 1.0:
        return 1.0
    return -math.expm1(t * math.log1p(-1.0 / N))


def weight(kind: str, t: int, N: float | None = None) -> float:
    r"""The weight :math:`w_t` on the new sample at step ``t`` for a constant horizon ``N``.

    ``kind`` is one of :data:`KINDS`; ``N`` (steps, ``>= 1``) is ignored for ``"mean"``.  See
    the module docstring for the formulas and for horizons that change between steps.
    """
    check_choice("kind", kind, KINDS)
    t = check_step("t", t)
    if kind == "mean":
        return 1.0 / t
    N = check_horizon("N", N)
    if kind == "ema":
        return 1.0 / N
    if kind == "lecture":
        return 1.0 / min(N, t)
    return (1.0 / N) / debias_factor(t, N)


def ema_mass(previous: float, N: float) -> float:
    r"""One step of the EMA's data mass, :math:`c_t = (1 - 1/N_t) c_{t-1} + 1/N_t`, :math:`c_0 = 0`.

    For a constant ``N`` this is :func:`debias_factor`; with a changing horizon it is
    :math:`1 - \prod_s (1 - 1/N_s)`.  Adam's corrected weight is ``(1/N) / ema_mass(...)``.
    """
    N = check_horizon("N", N)
    return (1.0 - 1.0 / N) * previous + 1.0 / N


def lecture_count(previous: float, N: float) -> float:
    r"""One step of the lecture average's effective count, :math:`n_t = \min(N_t, n_{t-1} + 1)`.

    ``n_0 = 0``; the lecture weight is ``1 / n_t``.  For a constant ``N``, :math:`n_t = \min(N,t)`.
    """
    N = check_horizon("N", N)
    return min(N, previous + 1.0)


def _horizons(t: int, N: float | Sequence[float] | None) -> list[float]:
    if N is None:
        raise ValueError("N must be a horizon >= 1 (or a sequence of t horizons), got None")
    if isinstance(N, int | float) and not isinstance(N, bool):
        return [check_horizon("N", N)] * t
    values = list(N)  # type: ignore[arg-type]
    if len(values) != t:
        raise ValueError(
            f"N must be one horizon or a sequence of t = {t} horizons, got {len(values)} values"
        )
    return [check_horizon(f"N[{i}]", v) for i, v in enumerate(values)]


def sample_weights(kind: str, t: int, N: float | Sequence[float] | None = None) -> np.ndarray:
    r"""The weights :math:`a_{t,s}` (``s = 1..t``) with :math:`\hat\mu_t = \sum_s a_{t,s} x_s`.

    ``N`` is one horizon or a sequence of ``t`` horizons (``N[s-1]`` used at step ``s``).
    Returned as a float64 array of length ``t``; for i.i.d. samples with mean :math:`\mu` and
    variance :math:`\sigma^2`, :math:`E\hat\mu_t = \mu\sum_s a_{t,s}` and
    :math:`\mathrm{Var}\,\hat\mu_t = \sigma^2 \sum_s a_{t,s}^2`.

    >>> sample_weights("ema", 3, 2).tolist()  # (1/N) beta^(t-s), exponent +(t-s)
    [0.125, 0.25, 0.5]
    """
    check_choice("kind", kind, KINDS)
    t = check_step("t", t)
    Ns = [math.inf] * t if kind == "mean" else _horizons(t, N)
    w = np.empty(t)
    mass = count = 0.0
    for s in range(t):
        if kind == "mean":
            w[s] = 1.0 / (s + 1)
        elif kind == "ema":
            w[s] = 1.0 / Ns[s]
        elif kind == "lecture":
            count = lecture_count(count, Ns[s])
            w[s] = 1.0 / count
        else:
            mass = ema_mass(mass, Ns[s])
            w[s] = (1.0 / Ns[s]) / mass
    # a_{t,s} = w_s * prod_{r > s} (1 - w_r): a reversed cumulative product.
    keep = np.concatenate([np.cumprod(1.0 - w[:0:-1])[::-1], [1.0]])
    return w * keep
