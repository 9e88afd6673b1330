"""The runnable examples in the module docstrings of sgdlab.dynamics stay true."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import sgdlab.dynamics

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(sgdlab.dynamics.__path__, "sgdlab.dynamics.")
) + ["sgdlab.dynamics"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    torch.set_num_threads(1)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_public_name_is_documented():
    for name in sgdlab.dynamics.__all__:
        obj = getattr(sgdlab.dynamics, name)
        assert (obj.__doc__ or "").strip(), f"sgdlab.dynamics.{name} has no docstring"
