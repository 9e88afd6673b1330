"""Shared fixtures: one tiny reproduce of every experiment per test session, and one tiny run
of the 1-D experiment that a test may edit (a fresh copy each)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sgdlab.lab import reproduce, run_experiment


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results directory holding every experiment run at the tiny preset, plus the report."""
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    out = tmp_path_factory.mktemp("tiny_reproduce")
    reproduce(out, preset="tiny", jobs=1)
    return out


@pytest.fixture(scope="session")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results directory holding the 1-D experiment at the tiny preset (not to be edited)."""
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    out = tmp_path_factory.mktemp("one_d") / "out"
    run_experiment("one_d", out, preset="tiny")
    return out


@pytest.fixture
def out(one_run: Path, tmp_path: Path) -> Path:
    """A copy of :func:`one_run` this test may edit."""
    dest = tmp_path / "out"
    shutil.copytree(one_run, dest)
    return dest
