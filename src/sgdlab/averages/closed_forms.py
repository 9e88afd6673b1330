r"""Closed forms for the running averages on i.i.d. samples.

Samples :math:`x_1, x_2, \dots` are i.i.d. with mean :math:`\mu` and variance :math:`\sigma^2`;
the horizon :math:`N \ge 1` is constant, :math:`\beta = 1 - 1/N`.  Every variance is returned
for a given ``sigma2`` (default 1, i.e. in units of :math:`\sigma^2`).

* EMA from :math:`\hat\mu_0 = 0`: :math:`E\hat\mu_t = (1-\beta^t)\mu`
  (:math:`E\hat\mu_1 = \mu/N`), :math:`\mathrm{Var}\,\hat\mu_t =
  \sigma^2 \frac{1-\beta}{1+\beta}(1-\beta^{2t})`, stationary :math:`\sigma^2/(2N-1)`.
* Adam's :math:`m_t/(1-\beta^t)`: unbiased, :math:`\mathrm{Var} = \sigma^2
  \frac{(1-\beta)(1+\beta^t)}{(1+\beta)(1-\beta^t)}` (:math:`N = t = 20`: 0.054298).
* The lecture's :math:`1/\min(N,t)`: the exact mean (variance :math:`\sigma^2/t`) for
  :math:`t \le N`; then, with :math:`m = \lfloor N \rfloor` and :math:`k = t - m`,
  :math:`\sigma^2[\beta^{2k}/m + \frac{1-\beta}{1+\beta}(1-\beta^{2k})]`.
* The exact mean: :math:`\sigma^2/t`.

Erratum 4 of the lecture (REFERENCE.md): the EMA is
:math:`\hat\mu_t = \frac1N\sum_{s\le t}\beta^{+(t-s)}x_s` (the slide writes the exponent with a
minus sign) with :math:`\sum_{n\ge0}\beta^n = N`; and it does not behave like an
:math:`N`-window.  Its stationary variance :math:`\sigma^2/(2N-1)` and its mean lag
:math:`\sum_n n\beta^n/N = N-1` are those of a window of :math:`2N-1` samples
(variance :math:`\sigma^2/W`, lag :math:`(W-1)/2`), see :func:`equivalent_window`.

Example::

    >>> from sgdlab.averages import adam_variance, ema_stationary_variance, equivalent_window
    >>> round(adam_variance(20, 20), 6)
    0.054298
    >>> ema_stationary_variance(10) == 1 / equivalent_window(10)
    True
"""

from __future__ import annotations

import math

from .._validation import check_choice, check_horizon, check_nonnegative
from .weights import KINDS, check_step, debias_factor

__all__ = [
    "mean_factor",
    "variance",
    "ema_mean_factor",
    "ema_variance",
    "ema_stationary_variance",
    "adam_variance",
    "lecture_variance",
    "mean_variance",
    "ema_mean_lag",
    "equivalent_window",
    "window_variance",
    "window_mean_lag",
]


def _beta(N: float) -> float:
    return 1.0 - 1.0 / check_horizon("N", N)


def ema_mean_factor(t: int, N: float) -> float:
    r""":math:`E\hat\mu_t/\mu = 1 - (1-1/N)^t` for the EMA started at 0 (the bias to zero)."""
    return debias_factor(t, N)


def ema_variance(t: int, N: float, sigma2: float = 1.0) -> float:
    r"""Variance of the EMA from 0.

    :math:`\mathrm{Var}\,\hat\mu_t = \sigma^2\frac{1-\beta}{1+\beta}(1-\beta^{2t})`.
    """
    t = check_step("t", t)
    b = _beta(N)
    return check_nonnegative("sigma2", sigma2) * (1 - b) / (1 + b) * (1 - b ** (2 * t))


def ema_stationary_variance(N: float, sigma2: float = 1.0) -> float:
    r"""The EMA's stationary variance :math:`\sigma^2/(2N-1)` (the :math:`t\to\infty` limit)."""
    N = check_horizon("N", N)
    return check_nonnegative("sigma2", sigma2) / (2 * N - 1)


def adam_variance(t: int, N: float, sigma2: float = 1.0) -> float:
    r"""Variance of Adam's corrected average :math:`m_t/(1-\beta^t)`.

    :math:`\sigma^2 (1-\beta)(1+\beta^t)/((1+\beta)(1-\beta^t))`; equals :math:`\sigma^2` at
    :math:`t = 1` and tends to the EMA's :math:`\sigma^2/(2N-1)`.
    """
    t = check_step("t", t)
    b = _beta(N)
    s2 = check_nonnegative("sigma2", sigma2)
    return s2 * (1 - b) * (1 + b**t) / ((1 + b) * debias_factor(t, N))


def lecture_variance(t: int, N: float, sigma2: float = 1.0) -> float:
    r"""Variance of the lecture's :math:`1/\min(N,t)` average.

    :math:`\sigma^2/t` for :math:`t \le N` (it is the exact mean there); afterwards the EMA
    recursion started from the exact mean of :math:`m = \lfloor N\rfloor` samples:
    :math:`\sigma^2[\beta^{2k}/m + \frac{1-\beta}{1+\beta}(1-\beta^{2k})]`, :math:`k = t-m`.
    """
    t = check_step("t", t)
    N = check_horizon("N", N)
    s2 = check_nonnegative("sigma2", sigma2)
    if t <= N:
        return s2 / t
    m = math.floor(N)
    b = 1.0 - 1.0 / N
    decay = b ** (2 * (t - m))
    return s2 * (decay / m + (1 - b) / (1 + b) * (1 - decay))


def mean_variance(t: int, sigma2: float = 1.0) -> float:
    r"""Variance of the exact mean of ``t`` samples, :math:`\sigma^2/t`."""
    return check_nonnegative("sigma2", sigma2) / check_step("t", t)


def mean_factor(kind: str, t: int, N: float | None = None) -> float:
    r""":math:`E\hat\mu_t/\mu` for ``kind``: the EMA's :math:`1-\beta^t`, otherwise 1 (unbiased)."""
    check_choice("kind", kind, KINDS)
    t = check_step("t", t)
    if kind == "ema":
        return ema_mean_factor(t, N)  # type: ignore[arg-type]
    if kind != "mean":
        check_horizon("N", N)
    return 1.0


def variance(kind: str, t: int, N: float | None = None, sigma2: float = 1.0) -> float:
    r""":math:`\mathrm{Var}\,\hat\mu_t` for ``kind`` (dispatches to the closed forms above)."""
    check_choice("kind", kind, KINDS)
    if kind == "mean":
        return mean_variance(t, sigma2)
    if kind == "ema":
        return ema_variance(t, N, sigma2)  # type: ignore[arg-type]
    if kind == "adam":
        return adam_variance(t, N, sigma2)  # type: ignore[arg-type]
    return lecture_variance(t, N, sigma2)  # type: ignore[arg-type]


def ema_mean_lag(N: float) -> float:
    r"""Mean age of the stationary EMA's weights, :math:`\sum_{n\ge0} n\,\beta^n/N = N - 1` steps.

    On a linear trend :math:`x_s = a s` the stationary EMA trails by exactly this:
    :math:`\hat\mu_t \to a(t - (N-1))`.
    """
    return check_horizon("N", N) - 1.0


def equivalent_window(N: float) -> float:
    r"""The window length :math:`W = 2N - 1` whose mean has the EMA's variance and mean lag."""
    return 2.0 * check_horizon("N", N) - 1.0


def window_variance(W: float, sigma2: float = 1.0) -> float:
    r"""Variance :math:`\sigma^2/W` of the mean of the last ``W`` samples."""
    return check_nonnegative("sigma2", sigma2) / check_horizon("W", W)


def window_mean_lag(W: float) -> float:
    r"""Mean age :math:`(W-1)/2` of a ``W``-sample window (newest sample has age 0)."""
    return (check_horizon("W", W) - 1.0) / 2.0
