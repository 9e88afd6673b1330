"""A claim of the lecture, its closed-form prediction, the measurement and the verdict.

Verdict rule (never hides a disagreement):

* ``kind="equal"``: the measurement agrees when ``|measured - predicted| <= tolerance``;
* ``kind="at_most"`` / ``"at_least"``: agrees when ``measured <= predicted + tolerance`` /
  ``measured >= predicted - tolerance`` (inequalities such as "loss lower than");
* if it agrees and the claim is one of the lecture's errata (``erratum`` set), the prediction is
  the corrected value and the verdict is ``"lecture corrected"`` (the lecture's own value is kept
  in ``lecture_value``); otherwise ``"agrees"``;
* a non-finite measurement, or one outside the tolerance, is ``"disagrees"``.

The tolerance is typically ``k`` standard errors (``k = 4``, REFERENCE.md's protocol) plus any
stated model error of a first-order reference; see :func:`tolerance`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["VERDICTS", "Claim", "tolerance", "verdict"]

VERDICTS = ("agrees", "disagrees", "lecture corrected")
KINDS = ("equal", "at_most", "at_least")


def tolerance(stderr: float, k: float = 4.0, model_error: float = 0.0) -> float:
    """``k * stderr + model_error`` (the z < k protocol plus a stated model error)."""
    return k * float(stderr) + float(model_error)


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def verdict(
    predicted: float, measured: float, tol: float, kind: str = "equal", erratum: int | None = None
) -> str:
    """The verdict string for one comparison (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
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

    @property
    def verdict(self) -> str:
        return verdict(self.predicted, self.measured, self.tolerance, self.kind, self.erratum)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d
