"""Atomic results and resume: a run that dies mid-experiment leaves no results.json and no
temporary files; finished experiments are skipped on rerun; --force redoes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgdlab.lab import is_finished, make_config, registry, run_experiment
from sgdlab.lab.atomic import TMP_PREFIX, atomic_path, atomic_write_json
from sgdlab.lab.runner import ResultsConflictError


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_failure_leaves_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert _files(tmp_path) == ["x.json"]


def test_crash_mid_experiment_then_resume_and_force(tmp_path: Path, monkeypatch) -> None:
    mod = registry.get("one_d")
    real_run = mod.run

    def dying_run(config, outdir):
        real_run(config, outdir)
        with atomic_path(Path(outdir) / "partial.png") as tmp:
            tmp.write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt  # the user hits Ctrl-C in the middle of a write

    monkeypatch.setattr(mod, "run", dying_run)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("one_d", tmp_path, preset="tiny")
    expdir = tmp_path / "one_d"
    assert not (expdir / "results.json").exists()
    assert not any(n.startswith(TMP_PREFIX) for n in _files(expdir))
    assert not (expdir / "partial.png").exists()

    monkeypatch.setattr(mod, "run", real_run)
    first = run_experiment("one_d", tmp_path, preset="tiny")
    assert first["status"] == "finished"
    saved = json.loads((expdir / "results.json").read_text())
    assert is_finished(expdir, make_config("one_d", "tiny"))

    calls = []
    monkeypatch.setattr(mod, "run", lambda c, o: calls.append(1) or real_run(c, o))
    again = run_experiment("one_d", tmp_path, preset="tiny")
    assert again["status"] == "skipped" and calls == []
    assert json.loads((expdir / "results.json").read_text()) == saved

    redo = run_experiment("one_d", tmp_path, preset="tiny", force=True)
    assert redo["status"] == "finished" and calls == [1]

    # A different config is not "finished": replacing its results takes --force, and the
    # refusal comes before anything is written.
    other_config = make_config("one_d", "tiny", {"draws": 3000})
    assert not is_finished(expdir, other_config)
    before = {p.name: p.read_bytes() for p in expdir.iterdir() if p.is_file()}
    with pytest.raises(
        ResultsConflictError,
        match=r"one_d holds finished results of another "
        r"configuration \(draws: 8000 -> 3000\); use --force",
    ):
        run_experiment("one_d", tmp_path, preset="tiny", overrides={"draws": 3000})
    assert {p.name: p.read_bytes() for p in expdir.iterdir() if p.is_file()} == before
    assert calls == [1]
    other = run_experiment("one_d", tmp_path, preset="tiny", overrides={"draws": 3000}, force=True)
    assert other["status"] == "finished" and calls == [1, 1]
    assert is_finished(expdir, other_config)


def test_interrupted_forced_rerun_keeps_the_finished_result(tmp_path: Path, monkeypatch) -> None:
    """``--force`` (or another config) interrupted mid-run: the last finished results.json
    stays until a new one replaces it (it was deleted before the rerun started, while the
    report still listed the experiment)."""
    run_experiment("one_d", tmp_path, preset="tiny")
    expdir = tmp_path / "one_d"
    saved = (expdir / "results.json").read_text()
    mod = registry.get("one_d")

    def interrupted(config, outdir):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "run", interrupted)
    for kwargs in ({"force": True}, {"overrides": {"draws": 3000}, "force": True}):
        with pytest.raises(KeyboardInterrupt):
            run_experiment("one_d", tmp_path, preset="tiny", **kwargs)
        assert (expdir / "results.json").read_text() == saved
    assert is_finished(expdir, make_config("one_d", "tiny"))


def test_cli_interrupt_and_bad_out_are_short_messages(tmp_path: Path, capsys, monkeypatch) -> None:
    from sgdlab.lab import cli

    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (str(afile), str(afile / "sub"), ""):
        assert cli.main(["run", "one_d", "--preset", "tiny", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sgdlab: error: --out") and "Traceback" not in err
    assert not (Path.cwd() / "one_d").exists()
    mod = registry.get("one_d")

    def interrupted(config, outdir):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "run", interrupted)
    assert cli.main(["run", "one_d", "--preset", "tiny", "--out", str(tmp_path / "o")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_stale_temporary_from_a_hard_kill_is_removed(tmp_path: Path) -> None:
    expdir = tmp_path / "one_d"
    expdir.mkdir()
    stale = expdir / (TMP_PREFIX + "results.json.abc.json")
    stale.write_text("{")
    run_experiment("one_d", tmp_path, preset="tiny")
    assert not stale.exists()
    assert (expdir / "results.json").is_file()


def test_hard_kill_leaves_no_half_written_results(tmp_path: Path) -> None:
    """SIGKILL a real `sgdlab run` mid-experiment: nothing half-written, and a rerun finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [
        sys.executable,
        "-c",
        "from sgdlab.lab.cli import main; main()",
        "run",
        "convergence",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path),
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "SGDLAB_PROGRESS": "0"})
    expdir = tmp_path / "convergence"
    deadline = time.time() + 60
    while not (expdir / "config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # inside the experiment now
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (expdir / "config.json").is_file()
    json.loads((expdir / "config.json").read_text())  # complete, valid JSON
    assert not (expdir / "results.json").exists()
    for p in expdir.iterdir():  # every file is either complete or a marked temporary
        assert p.name.startswith(TMP_PREFIX) or p.name == "config.json", p.name
    res = run_experiment("convergence", tmp_path, preset="tiny")
    assert res["status"] == "finished"
    assert not any(p.name.startswith(TMP_PREFIX) for p in expdir.iterdir())


def test_parallel_jobs_match_serial(tmp_path: Path) -> None:
    """--jobs 2 (spawned processes) gives the same measurements as one process."""
    from sgdlab.lab import reproduce

    names = ["one_d", "running_averages"]
    reproduce(tmp_path / "serial", preset="tiny", jobs=1, names=names)
    reproduce(tmp_path / "parallel", preset="tiny", jobs=2, names=names)
    for n in names:
        a = json.loads((tmp_path / "serial" / n / "results.json").read_text())
        b = json.loads((tmp_path / "parallel" / n / "results.json").read_text())
        assert a["measurements"] == b["measurements"]
        assert a["claims"] == b["claims"]
    assert (tmp_path / "parallel" / "index.html").is_file()


def test_non_finite_values_survive_the_round_trip(tmp_path: Path) -> None:
    """A diverged run (inf loss) or a missing value (nan) is saved as valid JSON and read back
    as the float it was, so plots and claims drawn from saved results see numbers."""
    import math

    from sgdlab.lab.atomic import read_json

    atomic_write_json(
        tmp_path / "r.json",
        {"loss": [1.0, float("inf")], "x": float("nan"), "s": "text", "neg": -math.inf},
    )
    raw = json.loads((tmp_path / "r.json").read_text())  # strict JSON parses it
    assert raw["loss"][1] == "inf" and raw["x"] == "nan"
    back = read_json(tmp_path / "r.json")
    assert back["loss"][1] == math.inf and math.isnan(back["x"]) and back["neg"] == -math.inf
    assert back["s"] == "text"
