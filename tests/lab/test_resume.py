"""Atomic results and resume: a run that dies mid-experiment leaves no results.json and no
temporary files; finished experiments are skipped on rerun; --force redoes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgdlab.lab import is_finished, make_config, registry, run_experiment
from sgdlab.lab.atomic import TMP_PREFIX, atomic_path, atomic_write_json


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

    # A different config is not "finished": it reruns.
    assert not is_finished(expdir, make_config("one_d", "tiny", {"draws": 3000}))
    other = run_experiment("one_d", tmp_path, preset="tiny", overrides={"draws": 3000})
    assert other["status"] == "finished" and calls == [1, 1]


def test_stale_temporary_from_a_hard_kill_is_removed(tmp_path: Path) -> None:
    expdir = tmp_path / "one_d"
    expdir.mkdir()
    stale = expdir / (TMP_PREFIX + "results.json.abc.json")
    stale.write_text("{")
    run_experiment("one_d", tmp_path, preset="tiny")
    assert not stale.exists()
    assert (expdir / "results.json").is_file()
