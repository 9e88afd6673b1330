"""Fixtures shared by the optimizer tests."""

from __future__ import annotations

import pytest

from sgdlab.optim import _fast


@pytest.fixture
def eager_kernels():
    """Run the fused path's kernels eagerly (the same functions inductor compiles;
    test_fast_compile checks compiled == eager), so option tables cost no compilation."""
    previous = _fast.set_compile(False)
    yield
    _fast.set_compile(previous)
