"""Exact mean first-passage time of 1-D overdamped Langevin dynamics by quadrature.

For ``dX = -L'(X) dt + sqrt(2T) dW`` started at ``a`` and stopped at the first hit of
``b > a`` (reflecting or no boundary on the left), the mean first-passage time is the
standard formula (Gardiner, "Stochastic Methods", sec. 5.5; Risken)

    tau(a -> b) = (1/T) int_a^b exp(L(y)/T) int_{-inf}^y exp(-L(z)/T) dz dy.

For ``b < a`` the problem is mirrored. Double well ``L = (x^2 - 1)^2/4`` at T = 0.1 from -1 to
+1: 66.27. SGD with learning rate eta, batch B and per-example noise variance sigma^2 maps to
``T = eta sigma^2 / (2B)`` with time ``t = sum of learning rates``.

Example::

    >>> from sgdlab.dynamics import mean_first_passage_time
    >>> round(mean_first_passage_time(lambda x: (x**2 - 1)**2 / 4, 0.1, -1.0, 1.0), 2)
    66.27
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._validation import check_finite, check_positive

__all__ = ["mean_first_passage_time"]


def mean_first_passage_time(
    loss: Callable[[np.ndarray], np.ndarray],
    temperature: float,
    start: float,
    target: float,
    barrier: float | None = None,
) -> float:
    """Mean time for ``dX = -L' dt + sqrt(2T) dW`` to go from ``start`` to ``target``.

    ``barrier`` is a reflecting boundary on the far side of ``start`` from ``target``
    (default: none). ``loss`` takes numpy arrays and must confine the process on that side.
    """
    from scipy.integrate import quad

    T = check_positive("temperature", temperature)
    a, b = check_finite("start", start), check_finite("target", target)
    if barrier is None:
        barrier = -np.inf if b > a else np.inf
    if a == b:
        return 0.0
    if b < a:  # mirror x -> -x so that the target lies to the right
        return mean_first_passage_time(lambda x: loss(-x), T, -a, -b, -barrier)
    if not barrier <= a:
        raise ValueError(
            f"barrier must lie beyond start (away from target), got "
            f"barrier={barrier}, start={a}, target={b}"
        )
    ys = np.linspace(a, b, 2001)
    shift = float(np.max(loss(ys)))  # keeps exp(L(y)/T) <= 1 on [a, b]

    def f(z: float) -> float:
        return np.exp(-(loss(z) - shift) / T)

    left = quad(f, barrier, a, limit=500, epsabs=0, epsrel=1e-12)[0] if barrier < a else 0.0

    def inner(y: float) -> float:
        return left + quad(f, a, y, limit=500, epsabs=0, epsrel=1e-12)[0]

    outer = quad(
        lambda y: np.exp((loss(y) - shift) / T) * inner(y), a, b, limit=500, epsabs=0, epsrel=1e-11
    )[0]
    tau = outer / T
    if not np.isfinite(tau):
        raise ValueError(f"the first-passage time overflowed at T={T}; the barrier is too high")
    return float(tau)
