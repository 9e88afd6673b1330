"""Progress of a run of experiments: one line per experiment without a terminal, one bar naming
the running experiment on a terminal, advanced by time (also for an experiment without inner
bars), with estimates from the recorded costs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgdlab.lab import registry
from sgdlab.lab.progress import Progress
from sgdlab.lab.runner import expected_costs

SRC = Path(__file__).resolve().parents[2] / "src"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_every_experiment_has_a_recorded_cost() -> None:
    assert set(registry.COST_S) == set(registry.names())
    for name in registry.names():
        for preset in ("tiny", "quick"):
            assert registry.cost(name, preset) == registry.COST_S[name][preset] > 0
        assert registry.cost(name, "full") == registry.FULL_SCALE * registry.COST_S[name]["quick"]


def test_expected_cost_is_the_last_run_at_the_same_preset(tmp_path: Path) -> None:
    from sgdlab.lab import run_experiment

    recorded = max(registry.cost("one_d", "tiny"), 0.1)  # a floor: every run costs something
    assert expected_costs(tmp_path, ["one_d"], "tiny") == {"one_d": recorded}
    res = run_experiment("one_d", tmp_path, preset="tiny")
    assert expected_costs(tmp_path, ["one_d"], "tiny") == {"one_d": max(res["wall_time_s"], 0.1)}
    assert expected_costs(tmp_path, ["one_d"], "quick") == {
        "one_d": registry.cost("one_d", "quick")
    }


def test_without_a_terminal_one_line_per_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SGDLAB_PROGRESS", raising=False)
    log = io.StringIO()
    p = Progress(["one_d", "slope"], {"one_d": 2.0, "slope": 70.0}, stream=log)
    p.started("one_d")
    p.finished("one_d", {"status": "finished", "wall_time_s": 1.0})
    p.started("slope")
    p.finished(
        "slope",
        {"status": "skipped", "reason": "finished results with the same configuration in d/slope"},
    )
    p.close()
    assert log.getvalue().splitlines() == [
        "sgdlab: [1/2] one_d started (expected about 2.0 s)",
        f"sgdlab: [1/2] one_d finished in {log.getvalue().split('finished in ')[1].split()[0]} s",
        "sgdlab: [2/2] slope started (expected about 1 min 10 s)",
        "sgdlab: [2/2] slope skipped: finished results with the same configuration in d/slope",
    ]
    monkeypatch.setenv("SGDLAB_PROGRESS", "0")
    quiet = io.StringIO()
    p = Progress(["one_d"], {"one_d": 2.0}, stream=quiet)
    p.started("one_d")
    p.finished("one_d", {"status": "finished"})
    p.close()
    assert quiet.getvalue() == ""


def test_on_a_terminal_the_bar_names_the_running_experiment_and_moves_with_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An experiment with no inner bar (data_parallel) still moves the bar: its elapsed time
    against its expected cost, never past the cost before it finishes."""
    import threading

    monkeypatch.delenv("SGDLAB_PROGRESS", raising=False)
    term = _Terminal()
    p = Progress(["one_d", "data_parallel"], {"one_d": 1.0, "data_parallel": 0.4}, stream=term)
    try:
        p.finished("one_d", {"status": "finished"})
        p.started("data_parallel")
        seen = threading.Event()
        for _ in range(200):  # the ticker refreshes every 0.5 s: wait for it, not for a time
            if p._bar.n > 1.0:
                seen.set()
                break
            threading.Event().wait(0.05)
        assert seen.is_set(), "the bar did not move while data_parallel ran"
        assert p._bar.n <= 1.0 + 0.95 * 0.4 + 1e-9
        assert "data_parallel [1/2 done]" in term.getvalue()
        p.finished("data_parallel", {"status": "finished"})
        assert p._bar.n == p._bar.total == 1.4
    finally:
        p.close()
    assert "[2/2] data_parallel finished in" in term.getvalue()


def test_cli_run_without_a_terminal_prints_its_lines(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SGDLAB_PROGRESS"}
    env["PYTHONPATH"] = str(SRC)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sgdlab.lab.cli",
            "run",
            "one_d",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    lines = out.stderr.splitlines()
    assert lines[0].startswith("sgdlab: [1/1] one_d started (expected about")
    assert lines[1].startswith("sgdlab: [1/1] one_d finished in ")
