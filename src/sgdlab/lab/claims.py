"""A claim of the lecture, its closed-form prediction, the measurement and the verdict.

Verdict rule (never hides a disagreement):

* ``kind="equal"``: the measurement agrees when ``|measured - predicted| <= tolerance``;
* ``kind="at_most"`` / ``"at_least"``: agrees when ``measured <= predicted + tolerance`` /
  ``measured >= predicted - tolerance`` (inequalities such as "loss lower than");
* if it agrees and the claim is one of the lecture's errata (``erratum`` set), the prediction is
  the corrected value and the verdict is ``"lecture corrected"`` (the lecture's own value is kept
  in ``lecture_value``); otherwise ``"agrees"``;
* a non-finite measurement, or one outside the tolerance, is ``"disagrees"``;
* ``"inconclusive"``: the experiment could not decide the claim (``inconclusive`` gives the
  reason: its tolerance would exceed the effect it tests, the grid's best point sat on the
  grid's edge, too few points to fit). Neither a pass nor a failure; never silent.

The tolerance is the sum of three stated parts (REFERENCE.md's z < k protocol plus the rest):
``tol_statistical`` (``k`` standard errors of the measurement, ``k = 4``), ``tol_grid`` (the
resolution of a grid search: an optimum is only known to half a grid step) and ``tol_model``
(the stated error of a first-order reference, or float64 rounding for an exact one); see
:func:`tolerance`.

A claim that tests an effect (``effect``, the predicted size of what it distinguishes, e.g. the
corrected value minus the lecture's) must resolve it: a tolerance larger than ``|effect|`` would
pass whether or not the effect is there, so :class:`Claim` refuses it (``ValueError``) unless the
claim is marked inconclusive. For an erratum, ``effect`` defaults to
``predicted - lecture_value``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["VERDICTS", "Claim", "Tolerance", "decides", "tolerance", "verdict"]

VERDICTS = ("agrees", "disagrees", "lecture corrected", "inconclusive")
KINDS = ("equal", "at_most", "at_least")


class Tolerance(float):
    """A tolerance (a float, their sum) that remembers its parts: ``statistical``, ``grid``,
    ``model`` (each >= 0)."""

    statistical: float
    grid: float
    model: float

    def __new__(cls, statistical: float = 0.0, grid: float = 0.0, model: float = 0.0) -> Tolerance:
        parts = {"statistical": _f(statistical), "grid": _f(grid), "model": _f(model)}
        for name, v in parts.items():
            if not v >= 0:  # rejects nan as well
                raise ValueError(f"tolerance part {name} must be a number >= 0, got {v!r}")
        self = super().__new__(cls, sum(parts.values()))
        for name, v in parts.items():
            setattr(self, name, v)
        return self

    def __reduce__(self) -> Any:
        return (Tolerance, (self.statistical, self.grid, self.model))


def tolerance(
    stderr: float, k: float = 4.0, model_error: float = 0.0, grid: float = 0.0
) -> Tolerance:
    """``k * stderr + grid + model_error``: the z < k protocol, a grid's resolution and a stated
    model error, kept apart (:class:`Tolerance`). A non-finite ``stderr`` counts as 0 (a
    measurement without a spread: an exact float64 identity or a grid read)."""
    se = _f(stderr)
    return Tolerance(k * se if math.isfinite(se) else 0.0, grid, model_error)


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def decides(tol: float, effect: float | None) -> bool:
    """Whether a tolerance ``tol`` can resolve ``effect``: ``tol <= |effect|`` (no effect given:
    nothing to resolve)."""
    if effect is None:
        return True
    return _f(tol) <= abs(_f(effect))


def verdict(
    predicted: float,
    measured: float,
    tol: float,
    kind: str = "equal",
    erratum: int | None = None,
    inconclusive: str = "",
) -> str:
    """The verdict string for one comparison (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if inconclusive:
        return "inconclusive"
    p, m, t = _f(predicted), _f(measured), _f(tol)
    if not (math.isfinite(m) and math.isfinite(p) and math.isfinite(t)):
        return "disagrees"
    if kind == "equal":
        ok = abs(m - p) <= t
    elif kind == "at_most":
        ok = m <= p + t
    else:
        ok = m >= p - t
    if not ok:
        return "disagrees"
    return "lecture corrected" if erratum is not None else "agrees"


@dataclass
class Claim:
    """One row of the claims table.

    ``statement`` is the lecture's claim in words; ``formula`` the formula checked (the corrected
    one for an erratum; the lecture's appears in ``lecture_formula``). ``exact`` marks a claim
    whose prediction is exact (not first order): the test suite asserts those verdicts.

    ``tolerance`` is a :class:`Tolerance` (from :func:`tolerance`) or a plain float; the parts
    ``tol_statistical``, ``tol_grid``, ``tol_model`` are filled from it (a plain float is split
    as ``4 * stderr`` statistical, the rest model error) unless given, and ``tolerance`` is
    their sum. ``seeds`` is the number of independent runs averaged (1 for an exact claim);
    ``effect`` and ``inconclusive``: see the module docstring.
    """

    id: str
    statement: str
    formula: str
    predicted: float
    measured: float
    stderr: float
    tolerance: float
    kind: str = "equal"
    exact: bool = True
    erratum: int | None = None
    lecture_formula: str = ""
    lecture_value: float | None = None
    note: str = ""
    effect: float | None = None
    seeds: int = 1
    inconclusive: str = ""
    tol_statistical: float | None = None
    tol_grid: float | None = None
    tol_model: float | None = None

    def __post_init__(self) -> None:
        self._split_tolerance()
        if self.effect is None and self.erratum is not None and self.lecture_value is not None:
            self.effect = _f(self.predicted) - _f(self.lecture_value)
        if self.effect is not None:
            self.effect = _f(self.effect)
        if not (isinstance(self.seeds, int) and self.seeds >= 1):
            raise ValueError(f"claim {self.id}: seeds must be an integer >= 1, got {self.seeds!r}")
        if not self.inconclusive and not decides(self.tolerance, self.effect):
            raise ValueError(
                f"claim {self.id}: tolerance {self.tolerance:.3g} exceeds its effect "
                f"{self.effect:.3g}; restate it or mark it inconclusive"
            )

    def _split_tolerance(self) -> None:
        given = (self.tol_statistical, self.tol_grid, self.tol_model)
        if all(v is None for v in given):
            t = self.tolerance
            if not isinstance(t, Tolerance):
                tf, se = _f(t), _f(self.stderr)
                stat = min(tf, 4.0 * se) if math.isfinite(se) and math.isfinite(tf) else 0.0
                t = Tolerance(stat, 0.0, tf - stat) if math.isfinite(tf) else None
            if t is None:  # a non-finite tolerance: kept, unsplit (the verdict says disagrees)
                self.tolerance = _f(self.tolerance)
                self.tol_statistical = self.tol_grid = self.tol_model = math.nan
                return
        else:
            t = Tolerance(*(0.0 if v is None else v for v in given))
        self.tol_statistical, self.tol_grid, self.tol_model = t.statistical, t.grid, t.model
        self.tolerance = float(t)

    @property
    def verdict(self) -> str:
        return verdict(
            self.predicted,
            self.measured,
            self.tolerance,
            self.kind,
            self.erratum,
            self.inconclusive,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d
