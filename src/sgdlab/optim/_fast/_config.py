"""Process-wide switches of the fused path: whether kernels are compiled, and the measured
first-call (compilation) times."""

from __future__ import annotations

import os

__all__ = ["COMPILE_SECONDS", "compile_enabled", "set_compile", "disable_compile"]

#: first-call seconds of every kernel variant run so far, compilation included, keyed by
#: (algorithm, options, device type, dtype, which optional buffers are absent)
COMPILE_SECONDS: dict[tuple, float] = {}

_state: dict[str, bool | str | None] = {
    "compile": os.environ.get("SGDLAB_FUSED_COMPILE", "1") != "0",
    "failure": None,
}


def compile_enabled() -> bool:
    """Whether fused kernels are compiled with torch.compile (else run eagerly on the flat
    buffers). Off when ``SGDLAB_FUSED_COMPILE=0``, after :func:`set_compile(False)`, or after a
    compilation failed."""
    return bool(_state["compile"]) and _state["failure"] is None


def set_compile(enabled: bool) -> bool:
    """Switch compilation of fused kernels on or off (clearing a recorded failure); returns
    the previous setting."""
    previous = compile_enabled()
    _state["compile"] = bool(enabled)
    _state["failure"] = None
    return previous


def disable_compile(reason: str) -> None:
    """Record that compilation failed; later steps run the kernels eagerly."""
    _state["failure"] = reason
