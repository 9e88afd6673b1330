"""The examples of docs/integrations.md run and leave the documented keys in TensorBoard."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
from integ_common import scalars

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
GROUP_KEYS = ("tr_sigma", "grad_sq_norm", "temperature", "lr", "beta1", "beta2", "eps")
KEYS = (
    "batch_size",
    "b_simple",
    "b_simple_smoothed",
    "tr_sigma",
    "grad_sq_norm",
    *(f"{k}/group0" for k in GROUP_KEYS),
)


def run(name, out):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(out))
    return scalars(out)


def check(found, prefix, batch_sizes):
    for key in KEYS:
        assert prefix + key in found, sorted(found)
        assert all(math.isfinite(v) for _, v in found[prefix + key]), key
    assert [v for _, v in found[prefix + "batch_size"]] == batch_sizes


def test_lightning_example(tmp_path):
    pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    check(run("lightning_tensorboard", tmp_path), "sgdlab/", [64, 64, 64, 8])


def test_trainer_gpt2_example(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    found = run("trainer_gpt2_tensorboard", tmp_path)
    check(found, "train/sgdlab/", [8, 8, 2])
    assert "train/loss" in found
