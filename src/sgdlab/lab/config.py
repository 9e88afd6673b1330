"""Typed experiment configurations, presets and ``key=value`` overrides.

Every experiment owns a dataclass ``Config`` derived from :class:`ExperimentConfig`; its field
defaults are the *quick* preset, and a module-level ``PRESETS`` dict holds the overrides that
make the *tiny* (test suite) and *full* presets. Overrides from the command line
(``--set key=value``) are parsed by the field's declared type; an unknown key or a value that
does not parse raises :class:`ConfigError`, whose message lists every valid key with its type.

Example::

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class C(ExperimentConfig):
    ...     steps: int = 100
    ...     etas: tuple[float, ...] = (0.1, 0.2)
    >>> build_config(C, {"full": {"steps": 1000}}, "full", {"etas": "0.5,1"}).etas
    (0.5, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "PRESET_NAMES",
    "ConfigError",
    "ExperimentConfig",
    "Range",
    "build_config",
    "check_device",
    "config_to_dict",
    "describe_fields",
    "field_range",
    "parse_value",
]

PRESET_NAMES = ("tiny", "quick", "full")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message lists what is valid."""


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (every element of a tuple field): ``ge <= x``,
    ``gt < x``, ``x <= le``, ``x < lt`` for the bounds given; floats must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __str__(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        parts = [f"{op} {_number(v)}" for op, v in bounds if v is not None]
        return " and ".join(parts) or "any finite value"

    def admits(self, x: float) -> bool:
        return (
            math.isfinite(x)
            and (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )


# Without a declared range: an int (a count, a size, a number of steps) is >= 1, a float (a
# rate, a scale) is > 0; an experiment declares the others in its Config's ``RANGES``.
DEFAULT_RANGES = {int: Range(ge=1), float: Range(gt=0)}
SEED_RANGE = Range(ge=0, le=2**32 - 1)  # numpy's seeds are 32-bit


@dataclass(frozen=True)
class ExperimentConfig:
    """Fields every experiment has: the random seed and the torch device for model training.

    Every numeric field is checked against its range (``RANGES[name]``, else
    :data:`DEFAULT_RANGES` by type) when the config is built, before anything runs or is
    written; a value outside it raises ``ValueError`` naming the field, the value and the range.
    """

    RANGES: ClassVar[Mapping[str, Range]] = {}

    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name, tp in _field_types(type(self)).items():
            rng = field_range(type(self), name, tp)
            if rng is None:
                continue
            value = getattr(self, name)
            for x in value if isinstance(value, tuple) else (value,):
                if isinstance(x, int | float) and not rng.admits(x):
                    raise ValueError(f"{name} must be {rng}, got {x!r}")
        dev = self.device
        if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {dev!r}")


def check_device(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` (``--device`` or ``--set device=``) exists
    on this machine: ``cuda`` needs ``torch.cuda.is_available()``, ``cuda:N`` a GPU number N."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but torch.cuda.is_available() is False; use device cpu"
        )
    n = torch.cuda.device_count()
    if device.startswith("cuda:") and int(device[5:]) >= n:
        raise ConfigError(
            f"device {device!r} requested but this machine has {n} GPU(s): cuda:0 to cuda:{n - 1}"
        )


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def field_range(cls: type, name: str, tp: Any) -> Range | None:
    """The declared (or default) range of field ``name`` of type ``tp``; None if not numeric."""
    if name == "seed":
        return SEED_RANGE
    if name in getattr(cls, "RANGES", {}):
        return cls.RANGES[name]
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    return DEFAULT_RANGES.get(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return f"comma-separated list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def describe_fields(cls: type) -> str:
    """One line per field: ``name: type [range] (default ...)``."""
    lines = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        rng = field_range(cls, f.name, tp)
        allowed = f" {rng}" if rng is not None else ""
        lines.append(f"  {f.name}: {_type_name(tp)}{allowed} (default {f.default!r})")
    return "\n".join(lines)


def _parse_scalar(tp: Any, text: str) -> Any:
    text = text.strip()
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean (true/false)")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    raise ValueError(f"unsupported field type {tp!r}")


def parse_value(tp: Any, text: str) -> Any:
    """Parse ``text`` as a value of the annotated type ``tp`` (scalars and homogeneous tuples)."""
    if typing.get_origin(tp) is tuple:
        (inner, *_rest) = typing.get_args(tp)
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise ValueError("empty list")
        return tuple(_parse_scalar(inner, p) for p in parts)
    return _parse_scalar(tp, text)


def _coerce(tp: Any, value: Any) -> Any:
    if isinstance(value, str):
        return parse_value(tp, value)
    if typing.get_origin(tp) is tuple:
        (inner, *_rest) = typing.get_args(tp)
        return tuple(_coerce(inner, v) for v in value)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ValueError(f"{value!r} is not a {_type_name(tp)}")


def build_config(
    cls: type,
    presets: Mapping[str, Mapping[str, Any]],
    preset: str,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """Build ``cls`` from its defaults, then the named preset, then ``overrides``.

    Raises :class:`ConfigError` naming the bad key or value and listing the valid fields.
    """
    if preset not in PRESET_NAMES:
        raise ConfigError(f"preset must be one of {', '.join(PRESET_NAMES)}; got {preset!r}")
    types = _field_types(cls)
    values: dict[str, Any] = {}
    merged = dict(presets.get(preset, {}))
    merged.update(overrides or {})
    for key, raw in merged.items():
        if key not in types:
            raise ConfigError(
                f"unknown config key {key!r} for {cls.__module__.rsplit('.', 1)[-1]}; "
                f"valid keys:\n{describe_fields(cls)}"
            )
        try:
            values[key] = _coerce(types[key], raw)
        except ValueError as exc:
            raise ConfigError(
                f"bad value for {key!r}: {exc}; expected {_type_name(types[key])}. "
                f"Valid keys:\n{describe_fields(cls)}"
            ) from None
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{exc}. Valid keys:\n{describe_fields(cls)}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
