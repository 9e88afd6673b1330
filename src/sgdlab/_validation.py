"""Input validation shared by every public entry point.

Every check raises :class:`ValueError` whose message names the parameter, the value it got
and what is allowed, so a bad configuration fails at construction rather than as a NaN
many steps later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def _fmt(value: Any) -> str:
    return repr(value)


def check_finite(name: str, value: Any) -> float:
    """Return ``value`` as a float, or raise if it is not a finite real number (a string or
    a bool is not one, though ``float`` would convert it)."""
    if isinstance(value, str | bytes | bool):
        raise ValueError(f"{name} must be a finite real number, got {_fmt(value)}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite real number, got {_fmt(value)}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite real number, got {_fmt(value)}")
    return x


def check_positive(name: str, value: Any) -> float:
    """Finite and > 0."""
    x = check_finite(name, value)
    if x <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {_fmt(value)}")
    return x


def check_nonnegative(name: str, value: Any) -> float:
    """Finite and >= 0."""
    x = check_finite(name, value)
    if x < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {_fmt(value)}")
    return x


def check_unit_interval(name: str, value: Any, *, closed_right: bool = False) -> float:
    """0 <= value < 1 (or <= 1 when ``closed_right``): a decay rate such as a momentum or beta."""
    x = check_finite(name, value)
    ok = 0.0 <= x <= 1.0 if closed_right else 0.0 <= x < 1.0
    if not ok:
        allowed = "0 <= value <= 1" if closed_right else "0 <= value < 1"
        raise ValueError(f"{name} must satisfy {allowed}, got {_fmt(value)}")
    return x


def check_horizon(name: str, value: Any) -> float:
    """An averaging horizon N (steps or examples): finite and >= 1."""
    x = check_finite(name, value)
    if x < 1:
        raise ValueError(f"{name} must be a horizon >= 1 (1 = no averaging), got {_fmt(value)}")
    return x


def check_count(name: str, value: Any) -> int:
    """A count (chains, steps, draws, processes, groups...): an integer >= 1 (numpy's integers
    too)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be an integer >= 1, got {_fmt(value)}")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise ValueError(f"{name} must be an integer >= 1, got {_fmt(value)}")
    if int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {_fmt(value)}")
    return int(value)


def check_batch_size(name: str, value: Any) -> int:
    """A batch size: an integer >= 1 (:func:`check_count`)."""
    return check_count(name, value)


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value`` must be one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {listed}; got {_fmt(value)}")
    return value
