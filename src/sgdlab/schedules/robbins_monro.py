r"""Robbins-Monro schedules :math:`\eta_t = \eta_0 (1 + t/\tau)^{-\gamma}` and their conditions.

The classical conditions for stochastic approximation (Robbins & Monro 1951; for SGD on a
smooth non-negative loss, Bertsekas & Tsitsiklis, *Neuro-Dynamic Programming*, 1996,
Prop. 3.5) are

.. math::
    \sum_t \eta_t = \infty \quad\text{and}\quad \sum_t \eta_t^2 < \infty .

For :math:`\eta_t = \eta_0(1+t/\tau)^{-\gamma}` they hold iff :math:`1/2 < \gamma \le 1`:
:math:`\sum\eta_t` diverges iff :math:`\gamma \le 1`, :math:`\sum\eta_t^2` converges iff
:math:`\gamma > 1/2`, and :math:`\eta_t \to 0` iff :math:`\gamma > 0`.  The lecture states the
theorem with ":math:`\eta_t\to 0` and :math:`\sum\eta_t = \infty`" only (erratum 3 of
REFERENCE.md): for :math:`0 < \gamma \le 1/2` those hold but the noise
:math:`\sum\eta_t^2` is not summable; for :math:`\gamma > 1` the total time
:math:`\sum\eta_t` is finite and SGD stalls short of the optimum.  :meth:`RobbinsMonro.conditions`
reports each.

Special cases: ``gamma = 0`` is a constant learning rate (:meth:`RobbinsMonro.constant`);
``tau = 1`` is :math:`c\,s^{-\gamma}` in the 1-based step :math:`s = t + 1`
(:meth:`RobbinsMonro.power_law`).

Example::

    >>> from sgdlab.schedules import RobbinsMonro
    >>> s = RobbinsMonro(eta0=0.5, tau=10, gamma=0.75)
    >>> s(0), round(s(10), 6)
    (0.5, 0.297302)
    >>> s.conditions().robbins_monro
    True
    >>> round(RobbinsMonro.power_law(1.0, 2.0).partial_sum(float("inf")), 12)  # zeta(2)
    1.644934066848
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .._validation import check_nonnegative, check_positive
from .base import Schedule, check_step

__all__ = ["RobbinsMonro", "Conditions"]

# Sums up to this many terms are computed term by term (numpy's pairwise summation);
# longer ones as an exact head plus an Euler-Maclaurin tail.
_DIRECT_LIMIT = 1 << 20
_HEAD = 4096
# B_{2j} / (2j)! for j = 1, 2, 3, 4.
_EM_COEFFS = (1.0 / 12.0, -1.0 / 720.0, 1.0 / 30240.0, -1.0 / 1209600.0)


@dataclass(frozen=True)
class Conditions:
    r"""Which classical step-size conditions a schedule satisfies.

    ``vanishes``: :math:`\eta_t \to 0`; ``sum_diverges``: :math:`\sum_t\eta_t = \infty`;
    ``squares_summable``: :math:`\sum_t\eta_t^2 < \infty`; ``robbins_monro``: the last two
    together (Robbins & Monro 1951; Bertsekas & Tsitsiklis Prop. 3.5); ``lecture``: the
    lecture's weaker pair (``vanishes`` and ``sum_diverges``, erratum 3).
    """

    gamma: float
    vanishes: bool
    sum_diverges: bool
    squares_summable: bool
    robbins_monro: bool
    lecture: bool

    def as_dict(self) -> dict[str, float | bool]:
        """The fields as a plain dict (for results files)."""
        return asdict(self)

    def __str__(self) -> str:
        def mark(ok: bool) -> str:
            return "yes" if ok else "no"

        return (
            f"gamma = {self.gamma:g}: eta_t -> 0: {mark(self.vanishes)}; "
            f"sum eta_t = inf: {mark(self.sum_diverges)}; "
            f"sum eta_t^2 < inf: {mark(self.squares_summable)}; "
            f"Robbins-Monro: {mark(self.robbins_monro)}"
        )


class RobbinsMonro(Schedule):
    r""":math:`\eta_t = \eta_0\,(1 + t/\tau)^{-\gamma}`, ``t = 0, 1, 2, ...``.

    Args:
        eta0: the learning rate at ``t = 0`` (> 0); also ``base``.
        tau: the time scale in steps over which the decay sets in (> 0).
        gamma: the decay exponent (>= 0; 0 is constant).

    :meth:`partial_sum` is exact: summed term by term up to :math:`2^{20}` steps, beyond that
    an exactly summed head of 4096 terms plus an Euler-Maclaurin tail whose remainder is below
    float64 resolution; ``steps=math.inf`` gives the full series (``inf`` when it diverges).
    """

    def __init__(self, eta0: float, tau: float = 1.0, gamma: float = 1.0) -> None:
        self.eta0 = check_positive("eta0", eta0)
        self.tau = check_positive("tau", tau)
        self.gamma = check_nonnegative("gamma", gamma)
        self.base = self.eta0

    @classmethod
    def constant(cls, lr: float) -> RobbinsMonro:
        """A constant learning rate ``lr`` (``gamma = 0``): neither condition's decay part holds."""
        return cls(check_positive("lr", lr), tau=1.0, gamma=0.0)

    @classmethod
    def power_law(cls, c: float, gamma: float) -> RobbinsMonro:
        r""":math:`\eta = c\,s^{-\gamma}` in the 1-based step :math:`s = t + 1` (``tau = 1``)."""
        return cls(check_positive("c", c), tau=1.0, gamma=gamma)

    def lr(self, t: int) -> float:
        return self.eta0 * (1.0 + t / self.tau) ** (-self.gamma)

    def values(self, steps: int) -> np.ndarray:
        steps = check_step("steps", steps)
        return self.eta0 * (1.0 + np.arange(steps) / self.tau) ** (-self.gamma)

    def conditions(self) -> Conditions:
        """Which of the classical conditions hold (see the module docstring)."""
        g = self.gamma
        diverges, summable = g <= 1.0, g > 0.5
        return Conditions(
            gamma=g,
            vanishes=g > 0.0,
            sum_diverges=diverges,
            squares_summable=summable,
            robbins_monro=diverges and summable,
            lecture=g > 0.0 and diverges,
        )

    def partial_sum(self, steps: int | float, power: float = 1.0) -> float:
        r""":math:`\sum_{t<T}\eta_t^p` for ``T = steps`` (an integer, or ``math.inf``)."""
        p = check_positive("power", power)
        infinite = steps == math.inf
        T = math.inf if infinite else check_step("steps", steps)
        a = p * self.gamma
        scale = self.eta0**p
        if a == 0.0:
            return scale * T
        if infinite and a <= 1.0:
            return math.inf
        if not infinite and T <= _DIRECT_LIMIT:
            return scale * float(np.sum((1.0 + np.arange(T) / self.tau) ** (-a)))
        head = float(np.sum((1.0 + np.arange(_HEAD) / self.tau) ** (-a)))
        return scale * (head + self._tail(a, _HEAD, T - 1))

    def _tail(self, a: float, K: int, M: float) -> float:
        r""":math:`\sum_{n=K}^{M} (1+n/\tau)^{-a}` by Euler-Maclaurin (``M`` may be inf)."""
        tau = self.tau
        uK = 1.0 + K / tau

        def f(u: float) -> float:  # u = 1 + x/tau
            return u ** (-a)

        def deriv(u: float, m: int) -> float:  # d^m/dx^m of (1 + x/tau)^(-a)
            coef = 1.0
            for i in range(m):
                coef *= -(a + i)
            return coef * u ** (-a - m) / tau**m

        if M == math.inf:
            integral = tau / (a - 1.0) * uK ** (1.0 - a)
            total = integral + 0.5 * f(uK)
            for j, c in enumerate(_EM_COEFFS, start=1):
                total -= c * deriv(uK, 2 * j - 1)
            return total
        uM = 1.0 + M / tau
        log_ratio = math.log1p((M - K) / (tau + K))
        if a == 1.0:
            integral = tau * log_ratio
        else:
            integral = tau / (1.0 - a) * uK ** (1.0 - a) * math.expm1((1.0 - a) * log_ratio)
        total = integral + 0.5 * (f(uK) + f(uM))
        for j, c in enumerate(_EM_COEFFS, start=1):
            total += c * (deriv(uM, 2 * j - 1) - deriv(uK, 2 * j - 1))
        return total

    def __repr__(self) -> str:
        return f"RobbinsMonro(eta0={self.eta0!r}, tau={self.tau!r}, gamma={self.gamma!r})"
