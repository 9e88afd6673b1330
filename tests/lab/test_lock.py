"""One run at a time per results directory, workers that end with their parent, and stale
temporaries of dead processes removed at the start of the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sgdlab.lab import run_experiment
from sgdlab.lab.atomic import TMP_PREFIX
from sgdlab.lab.lock import DirectoryBusyError, output_lock

ENV = {**os.environ, "SGDLAB_PROGRESS": "0"}


def _sgdlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "sgdlab.lab.cli", *args]


def _wait_for(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# `sgdlab run one_d` whose experiment waits, once started, until the file GATE exists.
GATED_RUN = """
import os, sys, time
from sgdlab.lab import registry
from sgdlab.lab.cli import main
mod = registry.get("one_d")
real_run = mod.run
def gated_run(config, outdir):
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.05)
    return real_run(config, outdir)
mod.run = gated_run
sys.exit(main(["run", "one_d", "--preset", "tiny", "--out", sys.argv[2]]))
"""


def test_second_run_on_the_same_out_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = subprocess.Popen([sys.executable, "-c", GATED_RUN, str(gate), str(out)], env=ENV)
    try:
        _wait_for(lambda: (out / "one_d" / "config.json").exists(), "the first run")
        for args in (["run", "convergence"], ["reproduce"]):
            cmd = _sgdlab(*args, "--preset", "tiny", "--out", str(out))
            second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr
            assert second.stderr.startswith("sgdlab: error:")
            assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None
        assert sorted(p.name for p in out.iterdir()) == [".sgdlab.lock", "one_d"]
    finally:
        gate.touch()
        rc = first.wait(timeout=300)
    assert rc == 0  # the first run was not disturbed
    assert (out / "one_d" / "results.json").is_file() and (out / "index.html").is_file()


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path: Path) -> None:
    with output_lock(tmp_path), output_lock(tmp_path):
        code = (
            "import sys; from sgdlab.lab.lock import output_lock\n"
            "try:\n  with output_lock(sys.argv[1]): pass\n"
            "except Exception as e: print(type(e).__name__, e); sys.exit(3)\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 3 and "DirectoryBusyError" in proc.stdout
        assert f"pid {os.getpid()}" in proc.stdout
    with output_lock(tmp_path):  # released on leaving
        pass
    assert issubclass(DirectoryBusyError, ValueError)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_die_with_a_killed_reproduce(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        _sgdlab("reproduce", "--preset", "tiny", "--jobs", "2", "--out", str(tmp_path)), env=ENV
    )
    try:
        workers: list[int] = []

        def two_workers_at_work() -> bool:
            workers[:] = [
                c
                for c in _children(parent.pid)
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
            ]
            started = [p for p in tmp_path.iterdir() if (p / "config.json").exists()]
            return len(workers) == 2 and len(started) >= 2

        _wait_for(two_workers_at_work, "two workers running experiments")
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10.0
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them running after a failure
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed parent"


def test_stale_temporaries_of_dead_processes_are_removed_at_start(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = tmp_path / f"{TMP_PREFIX}{dead.pid}-results.json.x1.json"
        old_style = tmp_path / f"{TMP_PREFIX}index.html.x2.html"
        stale_dir = tmp_path / "one_d" / f"{TMP_PREFIX}{dead.pid}-figures.x3"
        stale_data = tmp_path / "_data" / f"{TMP_PREFIX}{dead.pid}-mnist1d.npz.x5.npz"
        stale_data.parent.mkdir()
        stale_data.write_bytes(b"PK")
        in_flight = tmp_path / f"{TMP_PREFIX}{live.pid}-index.html.x4.html"
        stale_dir.mkdir(parents=True)
        (stale_dir / "variance.png").write_bytes(b"\x89PNG")
        for p in (stale, old_style, in_flight):
            p.write_text("{")
        run_experiment("one_d", tmp_path, preset="tiny")
        assert not stale.exists() and not old_style.exists() and not stale_dir.exists()
        assert not stale_data.exists()
        assert in_flight.exists()  # another live process's temporary is not touched
    finally:
        live.kill()
        live.wait()
