"""Every experiment at its tiny preset: it finishes, writes its files, and every exact claim
(closed form or float64 identity) gets the verdict the closed form demands.

The run itself is the session fixture ``tiny_run`` (one tiny ``reproduce`` of all experiments);
these tests read what it saved.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from sgdlab.lab import registry
from sgdlab.lab.claims import VERDICTS
from sgdlab.lab.errata import ERRATA

NAMES = registry.names()

# Claims whose measurement must settle an erratum in the corrected direction at the tiny preset.
MUST_CORRECT = {
    "convergence.stall",
    "running_averages.ema_variance",
    "running_averages.weight_sum",
    "batch_scaling.momentum_min_rule",
    "adam_bias.lecture_update",
    "rmsprop_power.eps_inside",
    "rmsprop_power.eps_outside_torch",
    "slope.reshuffle_excess",
    "langevin_1d.alpha",
}


def _record(out: Path, name: str) -> dict:
    return json.loads((out / name / "results.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_experiment_finished_with_files(tiny_run: Path, name: str) -> None:
    rec = _record(tiny_run, name)
    assert rec["experiment"] == name
    assert rec["meta"]["preset"] == "tiny"
    assert rec["claims"], f"{name} made no claims"
    assert rec["figures"]
    for fig in rec["figures"]:
        data = (tiny_run / name / fig).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    cfg = json.loads((tiny_run / name / "config.json").read_text())
    assert cfg["experiment"] == name and cfg["preset"] == "tiny"
    assert not [p for p in (tiny_run / name).iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("name", NAMES)
def test_exact_claims_agree(tiny_run: Path, name: str) -> None:
    """Exact claims must not disagree: a disagreement is a bug in the code or the closed form."""
    rec = _record(tiny_run, name)
    for c in rec["claims"]:
        assert c["verdict"] in VERDICTS
        if c["exact"]:
            assert c["verdict"] != "disagrees", (
                f"{c['id']}: predicted {c['predicted']}, measured {c['measured']} "
                f"+- {c['stderr']} (tolerance {c['tolerance']})"
            )


def test_errata_are_settled(tiny_run: Path) -> None:
    summary = json.loads((tiny_run / "results.json").read_text())
    by_id = {c["id"]: c for c in summary["claims"]}
    for cid in MUST_CORRECT:
        assert by_id[cid]["verdict"] == "lecture corrected", by_id[cid]
    assert len(summary["errata"]) == len(ERRATA) == 9
    for e in summary["errata"]:
        assert e["settled_by"], f"erratum {e['number']} has no measurement"
        assert not e["missing"], e


def test_claim_ids_unique_and_complete(tiny_run: Path) -> None:
    summary = json.loads((tiny_run / "results.json").read_text())
    ids = [c["id"] for c in summary["claims"]]
    assert len(ids) == len(set(ids))
    assert set(summary["experiments"]) == set(NAMES)
    for c in summary["claims"]:
        for key in (
            "id",
            "statement",
            "formula",
            "predicted",
            "measured",
            "stderr",
            "tolerance",
            "verdict",
        ):
            assert c[key] is not None and c[key] != "", (c["id"], key)


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", NAMES)
def test_figures_fit_the_page(tiny_run: Path, name: str) -> None:
    """At most 1000 px wide (the report's page width) yet at print resolution (150 dpi: a
    one-panel figure is at least 600 px wide)."""
    for fig in _record(tiny_run, name)["figures"]:
        w, h = _png_size((tiny_run / name / fig).read_bytes())
        assert 600 <= w <= 1000 and 200 <= h <= 2000, (fig, w, h)


@pytest.mark.parametrize("name", NAMES)
def test_claims_state_their_tolerance(tiny_run: Path, name: str) -> None:
    """Every claim carries the contract's fields: the tolerance is the sum of its stated parts,
    no decided claim passes on a tolerance larger than its effect, and seeds >= 1."""
    for c in _record(tiny_run, name)["claims"]:
        parts = [float(c[k]) for k in ("tol_statistical", "tol_grid", "tol_model")]
        tol = float(c["tolerance"])
        if math.isfinite(tol):
            assert all(p >= 0 for p in parts), c["id"]
            assert math.isclose(sum(parts), tol, rel_tol=1e-12, abs_tol=1e-300), c["id"]
        assert isinstance(c["seeds"], int) and c["seeds"] >= 1, c["id"]
        if c["effect"] is not None and c["verdict"] != "inconclusive":
            assert tol <= abs(float(c["effect"])), c["id"]
        if c["verdict"] == "inconclusive":
            assert c["inconclusive"], c["id"]


@pytest.mark.parametrize("name", NAMES)
def test_curves_and_dropped_recorded(tiny_run: Path, name: str) -> None:
    """The data of every panel is kept as numbers (``curves``), and every dropped point says
    why: both at the top level of results.json, once (not in the measurements)."""
    m = _record(tiny_run, name)
    assert "curves" not in m["measurements"] and "dropped" not in m["measurements"]
    assert m["curves"], name
    for key, curve in m["curves"].items():
        assert curve["series"], (name, key)
        for label, s in curve["series"].items():
            assert len(s["x"]) == len(s["y"]), (name, key, label)
            assert s["yerr"] is None or len(s["yerr"]) == len(s["y"]), (name, key, label)
    for d in m["dropped"]:
        assert set(d) == {"point", "reason"} and d["reason"], (name, d)
