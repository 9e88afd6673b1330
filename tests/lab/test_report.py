"""The report shows the fields of the results contract when a record has them (the tolerance's
parts, seeds, effect size, dropped points) and renders records older than them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sgdlab.lab import build_report
from sgdlab.lab.runner import DamagedResultError, load_result


def _edit(out: Path, fn) -> dict:
    path = out / "one_d" / "results.json"
    rec = json.loads(path.read_text())
    fn(rec)
    path.write_text(json.dumps(rec))
    return rec


def _section(page: str, name: str) -> str:
    return page.split(f"<section id='exp-{name}'>")[1].split("</section>")[0]


def test_old_records_render_without_the_new_columns(out: Path) -> None:
    def strip(rec: dict) -> None:  # a results.json of an older version
        for c in rec["claims"]:
            for key in ("tol_statistical", "tol_grid", "tol_model", "seeds", "effect"):
                c.pop(key, None)
        rec.pop("dropped", None)
        rec.pop("curves", None)

    _edit(out, strip)
    page = build_report(out).read_text()
    sec = _section(page, "one_d")
    assert "&plusmn; statistical" not in sec and "Points left out" not in sec
    assert "<th>seeds</th>" in sec  # the column is there, empty for an old record


def test_tolerance_parts_seeds_effect_and_dropped_points_are_shown(out: Path) -> None:
    def add(rec: dict) -> None:
        c = rec["claims"][0]
        c.update(
            tol_statistical=0.25,
            tol_grid=0.5,
            tol_model=0.125,
            tolerance=0.875,
            seeds=5,
            effect=3.5,
        )
        rec["dropped"] = [{"point": "B = 512", "reason": "never reached the target loss"}]

    rec = _edit(out, add)
    page = build_report(out).read_text()
    sec = _section(page, "one_d")
    for head in ("&plusmn; statistical", "&plusmn; grid", "&plusmn; model", "seeds"):
        assert f"<th>{head}</th>" in sec
    row = sec.split(f"data-claim='{rec['claims'][0]['id']}'>")[1].split("</tr>")[0]
    cells = [c.split(">", 1)[1] for c in row.split("</td>")[:-1]]
    assert cells[5:9] == ["0.25", "0.5", "0.125", "5"]
    assert "effect tested: 3.5" in cells[4] and cells[4].startswith("0.875")
    assert "<li><b>B = 512</b>: never reached the target loss</li>" in sec
    # and in the summary's findings, linked to the section's list
    summary = page.split("<section id='summary'>")[1].split("</section>")[0]
    assert "href='#dropped-one_d'" in summary and "id='dropped-one_d'" in sec


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tol_grid", [1]),
        ("seeds", 2.5),
        ("seeds", True),
        ("effect", {}),
        ("dropped", "B=512"),
        ("dropped", [{"point": 512, "reason": "x"}]),
        ("curves", []),
    ],
)
def test_new_fields_of_the_wrong_type_make_the_record_damaged(
    out: Path, field: str, value: object
) -> None:
    def spoil(rec: dict) -> None:
        if field in ("dropped", "curves"):
            rec[field] = value
        else:
            rec["claims"][0][field] = value

    _edit(out, spoil)
    with pytest.raises(DamagedResultError, match=field):
        load_result(out / "one_d")
    page = build_report(out).read_text()  # reported and skipped, never fatal
    assert "Results that could not be read" in page
