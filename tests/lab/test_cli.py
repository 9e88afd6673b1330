"""The command line: listing, error paths (exit code 2 with the valid choices), run and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgdlab.lab import registry
from sgdlab.lab.cli import main


def test_list_names_every_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in registry.names():
        assert name in out
    assert "draws: int" in out  # config keys and types are listed


def test_unknown_experiment_exits_2_and_lists_valid(capsys, tmp_path: Path) -> None:
    assert main(["run", "no_such_experiment", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_experiment" in err
    for name in registry.names():
        assert name in err


def test_unknown_key_exits_2_and_lists_keys(capsys, tmp_path: Path) -> None:
    assert main(["run", "one_d", "--set", "bogus=3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "draws: int" in err and "batch_sizes" in err
    assert not (tmp_path / "one_d").exists()


@pytest.mark.parametrize("item", ["draws=abc", "draws=1.5", "batch_sizes=1,x", "draws"])
def test_wrong_type_exits_2(capsys, tmp_path: Path, item: str) -> None:
    assert main(["run", "one_d", "--set", item, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert not (tmp_path / "one_d").exists()


def test_bad_preset_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "one_d", "--preset", "huge", "--out", str(tmp_path)])
    assert exc.value.code == 2


def test_report_of_empty_dir_exits_2(capsys, tmp_path: Path) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished experiment" in capsys.readouterr().err


def test_run_with_overrides_records_config_seed_and_versions(capsys, tmp_path: Path) -> None:
    args = [
        "run",
        "one_d",
        "--preset",
        "tiny",
        "--set",
        "batch_sizes=2,8",
        "--set",
        "draws=4000",
        "--seed",
        "7",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    rec = json.loads((tmp_path / "one_d" / "results.json").read_text())
    assert rec["config"]["batch_sizes"] == [2, 8]
    assert rec["config"]["draws"] == 4000
    assert rec["meta"]["seed"] == 7 and rec["config"]["seed"] == 7
    for key in ("sgdlab", "torch", "numpy", "device", "wall_time_s", "git_commit"):
        assert key in rec["meta"]
    assert json.loads((tmp_path / "one_d" / "config.json").read_text())["draws"] == 4000
    top = json.loads((tmp_path / "results.json").read_text())
    fields = {
        "id",
        "statement",
        "formula",
        "predicted",
        "measured",
        "stderr",
        "tolerance",
        "verdict",
    }
    assert top["claims"] and all(fields <= set(c) for c in top["claims"])
    assert (tmp_path / "index.html").is_file()
    # `sgdlab report DIR` rebuilds the page from the saved results, redrawing a lost figure.
    (fig,) = rec["figures"]
    assert fig.startswith("variance.") and fig.endswith(".png")
    (tmp_path / "one_d" / fig).unlink()
    (tmp_path / "index.html").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").is_file()
    assert (tmp_path / "one_d" / fig).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("item", ["device=tpu", "seed=-1"])
def test_invalid_values_exit_2(capsys, tmp_path: Path, item: str) -> None:
    assert main(["run", "one_d", "--set", item, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert item.split("=")[0] in err and "draws: int" in err


@pytest.mark.parametrize("name", registry.names())
def test_every_preset_builds(name: str) -> None:
    from sgdlab.lab import make_config

    for preset in ("tiny", "quick", "full"):
        cfg = make_config(name, preset)
        assert cfg.seed == 0 and cfg.device == "cpu"


def test_gradient_flow_rejects_steps_that_do_not_divide_time(capsys, tmp_path: Path) -> None:
    args = ["run", "gradient_flow", "--set", "lrs=0.16,0.08", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "divide time" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "item", "shown"),
    [
        ("one_d", "draws=0", "draws must be >= 2, got 0"),
        ("one_d", "n=1", "n must be >= 2, got 1"),
        ("one_d", "batch_sizes=0", "batch_sizes must be >= 1, got 0"),
        ("one_d", "batch_sizes=4,65", "batch_sizes must be <= n=64, got 65"),
        ("one_d", "seed=4294967296", "seed must be >= 0 and <= 4294967295, got 4294967296"),
        ("convergence", "chains=1", "chains must be >= 2, got 1"),
        ("adam_bias", "beta2=1", "beta2 must be >= 0 and < 1, got 1.0"),
        ("adam_bias", "lr=nan", "lr must be > 0, got nan"),
        ("running_averages", "mu=inf", "mu must be any finite value, got inf"),
    ],
)
def test_out_of_range_values_exit_2_before_anything_is_written(
    capsys, tmp_path: Path, name: str, item: str, shown: str
) -> None:
    out = tmp_path / "out"
    assert main(["run", name, "--set", item, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sgdlab: error: {shown}") and "Traceback" not in err
    assert len(err.splitlines()[0]) < 200
    assert not out.exists()


def test_seed_option_out_of_range_exits_2(capsys, tmp_path: Path) -> None:
    assert main(["run", "one_d", "--seed", "4294967296", "--out", str(tmp_path / "o")]) == 2
    assert "seed must be >= 0 and <= 4294967295" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", registry.names())
def test_every_numeric_field_rejects_values_outside_its_range(name: str) -> None:
    """Invariant: for each numeric field, a value just outside its declared range (or a
    non-finite float) is refused when the config is built, naming the field."""
    import dataclasses
    import math
    import typing

    from sgdlab.lab import ConfigError, make_config
    from sgdlab.lab.config import field_range

    cls = registry.get(name).Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        rng = field_range(cls, f.name, hints[f.name])
        if rng is None:
            continue
        scalar = typing.get_args(hints[f.name])[0] if typing.get_args(hints[f.name]) else None
        is_int = (scalar or hints[f.name]) is int
        bad = [] if is_int else [math.nan, math.inf]
        outside = {"ge": -1, "gt": 0, "le": 1, "lt": 0}  # a step past each bound
        bad += [getattr(rng, k) + d for k, d in outside.items() if getattr(rng, k) is not None]
        for v in bad:
            text = str(int(v)) if is_int else repr(float(v))
            with pytest.raises(ConfigError, match=rf"^{f.name} must be"):
                make_config(name, "tiny", {f.name: text})


def test_version(capsys) -> None:
    import sgdlab

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sgdlab {sgdlab.__version__}"


def test_every_argument_of_every_command_is_documented(capsys) -> None:
    import argparse

    from sgdlab.lab.cli import DEFAULT_OUT, _parser

    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"list", "run", "reproduce", "report"}
    for name, cmd in sub.choices.items():
        assert cmd.description, name
        for action in cmd._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    for name in ("run", "reproduce"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert f"default: ./{DEFAULT_OUT}" in capsys.readouterr().out


def test_list_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """``sgdlab list | head``: the reader is gone before the first write (its end of the pipe
    is closed at once); no traceback, exit 141 (128 + SIGPIPE)."""
    import os
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sgdlab.lab.cli", "list"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_set_device_goes_through_the_device_check(capsys, tmp_path: Path) -> None:
    """``--set device=cuda`` on a machine without CUDA is refused like ``--device cuda`` (it
    ran on the CPU and was reported as cuda), before anything is written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")
    out = tmp_path / "out"
    for args in (["--set", "device=cuda"], ["--set", "device=cuda:0"], ["--device", "cuda"]):
        assert main(["run", "one_d", "--preset", "tiny", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sgdlab: error: device 'cuda") and "is_available() is False" in err
        assert len(err.splitlines()[0]) < 200
        assert not out.exists()
    assert main(["reproduce", "--preset", "tiny", "--device", "cuda", "--out", str(out)]) == 2
    assert "is_available() is False" in capsys.readouterr().err


def test_rerun_with_another_config_refuses_unless_force_and_skips_say_why(
    capsys, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    base = ["run", "one_d", "--preset", "tiny", "--out", str(out)]
    assert main(base) == 0
    capsys.readouterr()
    expdir = out / "one_d"
    before = {p.name: p.read_bytes() for p in expdir.iterdir() if p.is_file()}
    # the same config: skipped, saying why
    assert main(base) == 0
    said = capsys.readouterr().out
    assert (
        f"one_d: skipped: finished results with the same configuration in {expdir} "
        "(use --force to rerun)"
    ) in said
    # another config: refused, nothing written (config.json still matches results.json)
    assert main([*base, "--set", "draws=4000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"sgdlab: error: {expdir} holds finished results of another "
        "configuration (draws: 8000 -> 4000); use --force"
    )
    assert {p.name: p.read_bytes() for p in expdir.iterdir() if p.is_file()} == before
    # a bad value: refused before the check of the saved results, nothing written
    for bad in ("draws=0", "draws=-5"):
        assert main([*base, "--set", bad]) == 2
        assert "draws must be >= 2" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in expdir.iterdir() if p.is_file()} == before
    # reproduce over results of another preset: refused too, naming the experiment
    assert main(["reproduce", "--preset", "quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another configuration for one_d" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in expdir.iterdir() if p.is_file()} == before
    # --force replaces them, and config.json and results.json agree
    assert main([*base, "--set", "draws=4000", "--force"]) == 0
    rec = json.loads((expdir / "results.json").read_text())
    cfg = json.loads((expdir / "config.json").read_text())
    assert rec["config"]["draws"] == cfg["draws"] == 4000
