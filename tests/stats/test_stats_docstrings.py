"""The runnable examples in sgdlab.stats docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize(
    "name",
    [
        "sgdlab.stats",
        "sgdlab.stats.tracker",
        "sgdlab.stats.noise",
        "sgdlab.stats.convert",
        "sgdlab.stats.custom",
    ],
)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
