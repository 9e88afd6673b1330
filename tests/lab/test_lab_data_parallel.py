"""The data-parallel experiment and ``sgdlab run --nproc N``.

Oracles: in the tiny preset (run through ``spawn`` by the session's ``reproduce``) the 2-rank
run equals its single-process replay in float64 (parameters, Adam state, noise meter), the
optimizer's learning rate and betas are the rule's values at the global batch, and the rule at
the per-rank batch departs further from the B0 curve than the rule at the global batch. The same
experiment launched by ``sgdlab run ... --nproc 2`` (torchrun, 2 gloo ranks) gives the same
numbers bit for bit, is reported once (rank 0) and writes only rank 0's files. ``--nproc``
errors exit with code 2 before any process starts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sgdlab import hyper
from sgdlab.lab import registry
from sgdlab.lab.cli import main


def _record(out: Path) -> dict:
    return json.loads((out / "data_parallel" / "results.json").read_text())


def test_spawned_ranks_match_the_single_process_oracles(tiny_run: Path) -> None:
    rec = _record(tiny_run)
    m = rec["measurements"]
    assert m["launcher"] == "spawn" and m["world_size"] == 2
    assert m["global_batch"] == 2 * m["micro_batch"] * m["accumulation"] == 128
    claims = {c["id"]: c for c in rec["claims"]}
    for cid in (
        "params",
        "adam_state",
        "ranks_identical",
        "tr_sigma",
        "b_simple",
        "global_batch",
        "effective_lr",
        "effective_beta1",
        "global_not_local",
    ):
        c = claims[f"data_parallel.{cid}"]
        assert c["verdict"] == "agrees", c
    for s in m["seeds"]:
        assert s["params_diff"] <= 1e-10 and s["state_diff"] <= 1e-10
        assert s["rank_spread"] == 0.0 and s["batches"] == [128]
        assert s["overlapped"] == s["steps"] == 4096 // 128  # every step overlapped
        assert s["gap_replay"] == pytest.approx(0.0, abs=1e-12)
    ref = hyper.PerStep(lr=m["ref_lr"], beta1=0.9, beta2=0.999, eps=1e-8)
    want = hyper.rescale(ref, m["ref_batch"], m["global_batch"], m["scaling"])
    eff = m["seeds"][0]["effective"]
    assert eff["lr"] == pytest.approx(want.lr, rel=1e-14) == 8 * m["ref_lr"]
    assert eff["beta1"] == pytest.approx(want.beta1, rel=1e-14)
    # the per-rank rule is what a run that ignores the other ranks would use: lr halves
    assert m["seeds"][0]["effective_local"]["lr"] == pytest.approx(want.lr / 2, rel=1e-14)
    (fig,) = _record(tiny_run)["figures"]
    assert fig.startswith("data_parallel.") and (tiny_run / "data_parallel" / fig).is_file()


def test_nproc_2_under_torchrun_equals_the_spawned_run(
    tiny_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dp"
    shutil.copytree(tiny_run / "_data", out / "_data")  # MNIST-1D cache: no regeneration
    rc = main(["run", "data_parallel", "--preset", "tiny", "--nproc", "2", "--out", str(out)])
    printed = capfd.readouterr().out
    assert rc == 0
    assert printed.count("data_parallel: finished") == 1  # rank 0 alone ran and reported
    assert "2 ranks" in printed
    files = sorted(p.name for p in (out / "data_parallel").iterdir())
    assert files == sorted(["config.json", "curves", *_record(out)["figures"], "results.json"])
    assert sorted(p.name for p in out.iterdir()) == [
        ".sgdlab.lock",
        "_data",
        "data_parallel",
        "index.html",
        "results.json",
    ]
    two, spawned = _record(out), _record(tiny_run)
    assert two["config"] == spawned["config"] and two["config"]["world_size"] == 2
    assert two["measurements"]["launcher"] == "torchrun"
    for key in spawned["measurements"]:
        if key != "launcher":
            assert two["measurements"][key] == spawned["measurements"][key], key
    assert [c["verdict"] for c in two["claims"]] == [c["verdict"] for c in spawned["claims"]]
    # finished: a second launch skips the run (rank 0 decides for every rank)
    assert (
        main(["run", "data_parallel", "--preset", "tiny", "--nproc", "2", "--out", str(out)]) == 0
    )
    assert "data_parallel: skipped" in capfd.readouterr().out


def test_nproc_on_a_single_process_experiment_exits_2(capsys, tmp_path: Path) -> None:
    assert main(["run", "one_d", "--nproc", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--nproc 2" in err and "one_d" in err and "data_parallel" in err
    assert registry.data_parallel() == ["data_parallel"]
    assert not (tmp_path / "one_d").exists()
    assert main(["list"]) == 0
    marked = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if "--nproc N" in ln]
    assert marked == ["data_parallel"]


@pytest.mark.parametrize("value", ["0", "-3", "two", "1.5"])
def test_bad_nproc_exits_2(capsys, tmp_path: Path, value: str) -> None:
    assert main(["run", "data_parallel", "--nproc", value, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--nproc must be an integer >= 1" in err and repr(value) in err
    assert not (tmp_path / "data_parallel").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        (["--nproc", "2", "--set", "world_size=3"], "contradicts --set world_size=3"),
        (["--set", "world_size=1"], "world_size must be an integer >= 2"),
        (["--set", "examples=1000"], "examples must be a multiple of evals"),
        (["--nproc", "2", "--set", "seeds=1"], "seeds must be an integer >= 2"),
    ],
)
def test_bad_data_parallel_config_exits_2_before_starting(capsys, tmp_path: Path, args, match):
    assert main(["run", "data_parallel", *args, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "data_parallel").exists()
