"""Each figure's data as CSV next to results.json (``DIR/<exp>/curves/NAME.csv``, from the
record's ``curves``) and as TensorBoard scalars (``sgdlab report DIR --tensorboard``), read back
with tensorboard's own EventAccumulator."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

from sgdlab.lab import registry, run_experiment
from sgdlab.lab.cli import main

CURVES = {
    "variance": {
        "x_label": "batch size B",
        "y_label": "Var(g_B)",
        "series": {
            "with replacement": {
                "x": [1, 4, 16],
                "y": [1.0, 0.25, 0.0625],
                "yerr": [0.01, 0.004, None],
            },
            "closed form, sigma^2/B": {"x": [1, 4, 16], "y": [1.0, 0.25, 0.0625], "yerr": None},
        },
    },
    "loss_vs_eta": {
        "x_label": "eta",
        "y_label": "excess loss",
        "series": {
            "sgd": {"x": [0.01, 0.1, 0.5], "y": [0.0025126, 0.0263158, "nan"], "yerr": None}
        },
    },
}


@pytest.fixture
def out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """one_d run at the tiny preset, its measurements carrying ``curves`` as the contract
    has them."""
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    mod = registry.get("one_d")
    real_run = mod.run
    monkeypatch.setattr(mod, "run", lambda c, o: {**real_run(c, o), "curves": CURVES})
    run_experiment("one_d", tmp_path, preset="tiny")
    monkeypatch.undo()
    return tmp_path


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_curves_are_written_as_csv_next_to_results(out: Path) -> None:
    rec = json.loads((out / "one_d" / "results.json").read_text())
    assert rec["curves"] == CURVES  # the record's top-level field of the contract
    cdir = out / "one_d" / "curves"
    assert sorted(p.name for p in cdir.iterdir()) == ["loss_vs_eta.csv", "variance.csv"]
    rows = _rows(cdir / "variance.csv")
    assert rows[0] == ["series", "batch size B", "Var(g_B)", "yerr"]
    got = [(r[0], float(r[1]), float(r[2]), float(r[3]) if r[3] else None) for r in rows[1:]]
    want = [
        (label, float(x), float(y), e)
        for label, s in CURVES["variance"]["series"].items()
        for x, y, e in zip(s["x"], s["y"], s["yerr"] or [None] * 3, strict=True)
    ]
    assert got == want  # round-trip exact
    rows = _rows(cdir / "loss_vs_eta.csv")
    assert [float(r[2]) if r[2] != "nan" else math.nan for r in rows[1:]][:2] == [
        0.0025126,
        0.0263158,
    ]
    # `sgdlab report` rewrites them from results.json, dropping curves the record lost
    (cdir / "variance.csv").unlink()
    rec["curves"] = {"variance": CURVES["variance"], "../escape": CURVES["variance"]}
    (out / "one_d" / "results.json").write_text(json.dumps(rec))
    assert main(["report", str(out)]) == 0
    assert sorted(p.name for p in cdir.iterdir()) == ["variance.csv"]
    assert not (out / "one_d" / "escape.csv").exists()


def test_old_results_without_curves_get_none(tmp_path: Path) -> None:
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    run_experiment("one_d", tmp_path, preset="tiny")
    # a results.json of an older version: no curves
    path = tmp_path / "one_d" / "results.json"
    record = json.loads(path.read_text())
    del record["curves"]
    path.write_text(json.dumps(record))
    shutil.rmtree(tmp_path / "one_d" / "curves")
    assert main(["report", str(tmp_path)]) == 0
    assert not (tmp_path / "one_d" / "curves").exists()


def test_tensorboard_export_reads_back(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["report", str(out), "--tensorboard"]) == 0
    assert "tensorboard: 2 curves in" in capsys.readouterr().out
    acc = EventAccumulator(str(out / "tensorboard" / "one_d"))
    acc.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    # integer x (batch sizes): the step is x
    assert scalars("variance/with replacement") == [(1, 1.0), (4, 0.25), (16, 0.0625)]
    assert scalars("variance/with replacement/yerr") == [
        (1, pytest.approx(0.01)),
        (4, pytest.approx(0.004)),
    ]
    assert "variance/closed form, sigma^2/B/yerr" not in acc.Tags()["scalars"]
    # float x (learning rates): the step is the index, x logged beside; nan left out
    assert scalars("loss_vs_eta/sgd") == [
        (0, pytest.approx(0.0025126)),
        (1, pytest.approx(0.0263158)),
    ]
    assert scalars("loss_vs_eta/sgd/x") == [
        (0, pytest.approx(0.01)),
        (1, pytest.approx(0.1)),
        (2, pytest.approx(0.5)),
    ]


def test_tensorboard_missing_is_a_clear_error(out: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["report", str(out), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "sgdlab: error: --tensorboard needs the tensorboard package: pip install tensorboard"
    )
    assert not (out / "tensorboard").exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing
