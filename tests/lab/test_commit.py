"""A results.json and its figures are committed together or not at all: a rerun interrupted
between drawing its figures and writing its results.json leaves the last finished result with
its own figures, and the next run removes the orphans."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from sgdlab.lab import is_finished, make_config, registry, run_experiment, runner


class _Killed(BaseException):
    """Stands for a kill -9 between two writes (nothing of the run cleans up after it)."""


def _snapshot(expdir: Path) -> dict[str, bytes]:
    rec = json.loads((expdir / "results.json").read_text())
    return {name: (expdir / name).read_bytes() for name in ["results.json", *rec["figures"]]}


@pytest.mark.parametrize("force", [True, False])
def test_rerun_killed_before_results_keeps_results_and_figures_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    """``--force`` (the code changed: other measurements for the same config) or another
    config, killed after the figure was drawn and before results.json was written."""
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    run_experiment("one_d", tmp_path, preset="tiny", overrides={"draws": 2000})
    expdir = tmp_path / "one_d"
    before = _snapshot(expdir)
    real_write, mod = runner.atomic_write_json, registry.get("one_d")

    def killed_at_results(path, obj):
        if Path(path).name == "results.json" and Path(path).parent == expdir:
            raise _Killed
        real_write(path, obj)

    monkeypatch.setattr(runner, "atomic_write_json", killed_at_results)
    if force:
        real_run = mod.run
        monkeypatch.setattr(mod, "run", lambda c, o: real_run(replace(c, draws=3000), o))
    with pytest.raises(_Killed):
        run_experiment(
            "one_d",
            tmp_path,
            preset="tiny",
            overrides={"draws": 2000 + 1000 * (not force)},
            force=True,  # another config's results are replaced only with --force
        )
    monkeypatch.undo()
    # the new figure was drawn, but the old results.json still names (and finds) its own
    assert _snapshot(expdir) == before
    assert is_finished(expdir, make_config("one_d", "tiny", {"draws": 2000}))

    res = run_experiment("one_d", tmp_path, preset="tiny", overrides={"draws": 2000})
    assert res["status"] == "skipped"
    # curves/ holds CSV copies of results.json's curves, rewritten from it (not committed)
    assert sorted(p.name for p in expdir.iterdir()) == sorted(["config.json", "curves", *before])
    assert _snapshot(expdir) == before


def test_a_finished_rerun_replaces_the_figures_of_the_last(tmp_path: Path) -> None:
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    run_experiment("one_d", tmp_path, preset="tiny", overrides={"draws": 2000})
    expdir = tmp_path / "one_d"
    old = json.loads((expdir / "results.json").read_text())["figures"]
    run_experiment("one_d", tmp_path, preset="tiny", overrides={"draws": 3000}, force=True)
    new = json.loads((expdir / "results.json").read_text())["figures"]
    assert set(old).isdisjoint(new)
    listed = sorted(p.name for p in expdir.iterdir())
    assert listed == sorted(["config.json", "curves", "results.json", *new])
