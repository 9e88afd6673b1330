"""Ctrl-C during ``sgdlab reproduce --jobs 2``: every process of the run ends at once, the queued
experiments never start, the finished results stay intact, and the message says how to resume
(exit 130)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from sgdlab.lab import registry
from sgdlab.lab.runner import load_result

SRC = Path(__file__).resolve().parents[2] / "src"


def _group_alive(pgid: int) -> str:
    """The processes left in group ``pgid`` (``ps`` lines; empty when none), after giving the
    last of them (multiprocessing's resource tracker sees its pipe close) up to 10 s."""
    for _ in range(100):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return ""
        threading.Event().wait(0.1)
    ps = subprocess.run(["ps", "-o", "pid,args", "-g", str(pgid)], capture_output=True, text=True)
    return ps.stdout


def test_ctrl_c_under_jobs_2_stops_every_worker_and_keeps_finished_results(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "SGDLAB_PROGRESS"}
    env["PYTHONPATH"] = str(SRC)
    # its own process group, as a shell gives a foreground job: Ctrl-C is SIGINT to the group
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sgdlab.lab.cli",
            "reproduce",
            "--preset",
            "tiny",
            "--jobs",
            "2",
            "--out",
            str(out),
        ],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    first_done = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if " finished in " in line:
                first_done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first_done.wait(300), "".join(lines)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=30)  # a hang guard: the queued experiments take minutes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    err = "".join(lines)
    assert rc == 130, err
    assert "Traceback" not in err, err
    assert f"resume with: sgdlab reproduce --preset tiny --out {out}" in err
    left = _group_alive(proc.pid)
    assert not left, f"processes outlived the interrupted run:\n{left}"
    # the finished experiments are intact, the others never wrote results
    finished = [n for n in registry.names() if (out / n / "results.json").exists()]
    announced = [line.split()[2] for line in lines if " finished in " in line]
    assert finished and set(announced) <= set(finished)
    assert len(finished) < len(registry.names())
    for n in finished:
        assert load_result(out / n)["meta"]["preset"] == "tiny"
    started = {
        line.split()[2] for line in lines if line.rstrip().endswith(")") and " started " in line
    }
    assert len(started) < len(registry.names()), "queued experiments were started"
    assert (out / "index.html").is_file()
    # resuming runs only what is left
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "sgdlab.lab.cli",
            "reproduce",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--jobs",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr
    for n in finished:
        assert f"{n} skipped: finished results with the same configuration" in rerun.stderr
