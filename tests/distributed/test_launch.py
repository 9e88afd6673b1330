"""Launch helpers: the torchrun command line, the environment checks, and one real 2-process
torchrun job of the example script whose trajectory equals the same run on one process."""

from __future__ import annotations

import json
import sys

import pytest

from sgdlab.distributed import example as example_script
from sgdlab.distributed import (
    init_from_env,
    launched_by_torchrun,
    run_with_torchrun,
    strip_nproc,
    torchrun_command,
)


def test_strip_nproc():
    assert strip_nproc(["run", "x", "--nproc", "4", "--seed", "1"]) == ["run", "x", "--seed", "1"]
    assert strip_nproc(["run", "--nproc=2", "x"]) == ["run", "x"]


def test_torchrun_command_single_node():
    cmd = torchrun_command(["run", "batch_scaling", "--nproc", "4"], 4)
    assert cmd == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc-per-node=4",
        "-m",
        "sgdlab.lab.cli",
        "run",
        "batch_scaling",
    ]


def test_torchrun_command_several_nodes():
    cmd = torchrun_command(
        ["--steps", "5"],
        8,
        module="train",
        nnodes=2,
        rdzv_endpoint="node0:29500",
        rdzv_id="job7",
        node_rank=1,
    )
    assert cmd[3:] == [
        "--nnodes=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:29500",
        "--rdzv-id=job7",
        "--node-rank=1",
        "--nproc-per-node=8",
        "-m",
        "train",
        "--steps",
        "5",
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nproc=0), "nproc must be an integer >= 1, got 0"),
        (dict(nproc=2, nnodes=2), "needs rdzv_endpoint"),
        (dict(nproc=2, nnodes=0), "nnodes must be an integer >= 1"),
    ],
)
def test_torchrun_command_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torchrun_command([], **kwargs)


def test_init_from_env_outside_torchrun(monkeypatch):
    for v in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
    ):
        monkeypatch.delenv(v, raising=False)
    assert not launched_by_torchrun()
    with pytest.raises(ValueError, match="missing RANK, WORLD_SIZE"):
        init_from_env()
    with pytest.raises(ValueError, match="timeout must be finite and > 0"):
        init_from_env(timeout=0)


def test_example_under_torchrun_follows_the_single_process_trajectory(tmp_path):
    """torchrun with 2 ranks (gloo) and 2 micro-batches per rank: every step has global batch
    32, and the parameters and noise readings equal the same script on one process."""
    args = ["--steps", "3", "--batch", "32", "--accumulation", "2", "--float64"]
    rc = run_with_torchrun(
        args + ["--out", str(tmp_path / "two.json"), "--nproc", "2"],
        2,
        module="sgdlab.distributed.example",
        timeout=180,
    )
    assert rc == 0
    assert example_script.main(args + ["--out", str(tmp_path / "one.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert [r["batch"] for r in two["log"]] == [32, 32, 32]
    assert two["param_norm"] == pytest.approx(one["param_norm"], rel=1e-12)
    for a, b in zip(two["log"], one["log"]):
        assert a["b_simple"] == pytest.approx(b["b_simple"], rel=1e-10)
