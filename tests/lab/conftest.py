"""Shared fixture: one tiny reproduce of every experiment per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sgdlab.lab import reproduce


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results directory holding every experiment run at the tiny preset, plus the report."""
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    out = tmp_path_factory.mktemp("tiny_reproduce")
    reproduce(out, preset="tiny", jobs=1)
    return out
