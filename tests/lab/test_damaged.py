"""A damaged results.json is named (with why) and skipped, never fatal to the rest; a file that
cannot be written is a one-line error (exit 2) that leaves the old file as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from sgdlab.lab import atomic, collect, is_finished, make_config, run_experiment
from sgdlab.lab.cli import main

DAMAGE = {
    "truncated": b"{",
    "binary": bytes(range(256)),
    "a list": b"[1, 2]",
    "no claims": json.dumps({"title": "t"}).encode(),
    "claims not objects": None,  # filled from a real record below
    "wall time a string": None,
    "kind a list": None,
}


def _damaged(real: dict, how: str) -> bytes:
    if DAMAGE[how] is not None:
        return DAMAGE[how]
    rec = json.loads(json.dumps(real))
    if how == "claims not objects":
        rec["claims"] = ["x"]
    elif how == "wall time a string":
        rec["meta"]["wall_time_s"] = "fast"
    else:
        rec["claims"][0]["kind"] = ["equal"]
    return json.dumps(rec).encode()


@pytest.fixture(scope="module")
def two_done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    out = tmp_path_factory.mktemp("damaged") / "out"
    for name in ("one_d", "running_averages"):
        run_experiment(name, out, preset="tiny")
    return out


@pytest.fixture
def out(two_done: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(two_done, dest)
    return dest


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_result_is_named_and_skipped(out: Path, how: str, capsys) -> None:
    path = out / "one_d" / "results.json"
    path.write_bytes(_damaged(json.loads(path.read_text()), how))
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{path} skipped: " in err and "Traceback" not in err
    page = (out / "index.html").read_text()
    assert "Results that could not be read" in page and "exp-running_averages" in page
    assert "exp-one_d" not in page
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["experiments"]) == ["running_averages"]
    assert [d["experiment"] for d in summary["damaged"]] == ["one_d"]
    assert not is_finished(out / "one_d", make_config("one_d", "tiny"))
    # an unrelated run goes on, and rerunning the damaged one replaces it
    assert main(["run", "running_averages", "--preset", "tiny", "--out", str(out)]) == 0
    assert main(["run", "one_d", "--preset", "tiny", "--out", str(out)]) == 0
    assert collect(out)["damaged"] == []


def test_a_linked_results_file_is_not_followed(out: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(out / "one_d" / "results.json", elsewhere)
    (out / "one_d" / "results.json").symlink_to(elsewhere)
    summary = collect(out)
    assert summary["damaged"][0]["why"] == "a symbolic link"
    assert "one_d" not in summary["experiments"]


@pytest.mark.parametrize(("where", "code"), [("fsync", errno.ENOSPC), ("mkstemp", errno.EROFS)])
def test_a_failed_write_is_one_line_and_leaves_the_old_file(
    out: Path, monkeypatch: pytest.MonkeyPatch, capsys, where: str, code: int
) -> None:
    assert main(["report", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "fsync":
        monkeypatch.setattr(atomic.os, "fsync", fail)
    else:
        monkeypatch.setattr(atomic.tempfile, "mkstemp", fail)
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"sgdlab: error: cannot write {out / 'results.json'}: {os.strerror(code)}\n"
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_failed_write_during_a_run_is_one_line(
    out: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real = atomic.os.fsync
    calls = []

    def full_after_figures(fd):
        calls.append(fd)
        if len(calls) > 2:  # config.json went through, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    saved = (out / "one_d" / "results.json").read_bytes()
    monkeypatch.setattr(atomic.os, "fsync", full_after_figures)
    args = ["run", "one_d", "--preset", "tiny", "--force", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("sgdlab: error: cannot write ") and "No space left" in err
    assert "Traceback" not in err
    assert (out / "one_d" / "results.json").read_bytes() == saved
    assert not [p for p in (out / "one_d").iterdir() if p.name.startswith(atomic.TMP_PREFIX)]


def test_a_write_error_crosses_a_process_boundary() -> None:
    """A worker of ``reproduce --jobs N`` that cannot write re-raises the same error here."""
    import pickle

    exc = atomic.WriteError("/out/one_d/results.json", "No space left on device")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is atomic.WriteError and str(back) == str(exc)
