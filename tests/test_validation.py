"""The shared argument checks of :mod:`sgdlab._validation`: a count and a batch size are both
integers >= 1, each named for what it is; ``check_batch_size`` is called for batch sizes only."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from sgdlab._validation import check_batch_size, check_count

SRC = Path(__file__).resolve().parents[1] / "src" / "sgdlab"


@pytest.mark.parametrize("check", [check_count, check_batch_size])
@pytest.mark.parametrize("value", [1, 7, np.int64(7), 7.0])
def test_integers_from_one_are_accepted(check, value):
    assert check("n", value) == int(value) and type(check("n", value)) is int


@pytest.mark.parametrize("check", [check_count, check_batch_size])
@pytest.mark.parametrize("value", [0, -3, 2.5, True, float("inf"), "4", None])
def test_others_are_refused_naming_parameter_and_value(check, value):
    with pytest.raises(ValueError, match=r"^chains must be an integer >= 1, got "):
        check("chains", value)


def _checked_names(function: str) -> list[tuple[str, str]]:
    """``(file, name)`` of each call ``function("name", ...)`` in src/sgdlab (lab/ aside)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("lab/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == function
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.append((rel, node.args[0].value))
    return found


def _is_batch_size(name: str) -> bool:
    return "batch_size" in name or name == "local_size"  # local_size: a rank's batch


def test_check_batch_size_checks_batch_sizes_only():
    others = [(f, n) for f, n in _checked_names("check_batch_size") if not _is_batch_size(n)]
    assert not others, f"counts checked as batch sizes (use check_count): {others}"


def test_check_count_checks_no_batch_size():
    sizes = [(f, n) for f, n in _checked_names("check_count") if _is_batch_size(n)]
    assert not sizes, f"batch sizes checked as counts (use check_batch_size): {sizes}"
