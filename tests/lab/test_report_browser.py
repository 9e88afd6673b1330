"""The report opens in headless Chromium: every figure decodes and the claims table is complete.

Chromium is Debian's ``chromium`` package (``/usr/bin/chromium``). Without it the test fails
with a message saying so; set ``SGDLAB_NO_BROWSER=1`` to skip it deliberately.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sgdlab.lab.claims import VERDICTS

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
]


def _chromium() -> str:
    if os.environ.get("SGDLAB_NO_BROWSER") == "1":
        pytest.skip("SGDLAB_NO_BROWSER=1: browser check of the report deliberately skipped")
    exe = os.environ.get("SGDLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(exe).exists():
        pytest.fail(
            "headless Chromium not found (install Debian's `chromium` package, or set "
            "SGDLAB_NO_BROWSER=1 to skip this check)"
        )
    return exe


class _Rows(HTMLParser):
    """Collect the claims table rows: data-claim id and the text of every cell."""

    def __init__(self) -> None:
        super().__init__()
        self.in_table = False
        self.rows: list[tuple[str, list[str]]] = []
        self.imgs: list[dict[str, str]] = []
        self.body: dict[str, str] = {}
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if tag == "img":
            self.imgs.append(a)
        if tag == "table" and a.get("id") == "claims-table":
            self.in_table = True
        if self.in_table and tag == "tr" and "data-claim" in a:
            self.rows.append((a["data-claim"], []))
        if self.in_table and tag == "td" and self.rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_table = False
        if tag == "td" and self._cell is not None and self.rows:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_report_renders_in_chromium(tiny_run: Path, tmp_path: Path) -> None:
    exe = _chromium()
    index = tiny_run / "index.html"
    assert index.is_file()
    url = index.resolve().as_uri()
    base = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1280,2400", url],
        capture_output=True, timeout=300, check=True,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot written"

    parsed = _Rows()
    parsed.feed(dom)
    summary = json.loads((tiny_run / "results.json").read_text())
    n_figures = sum(len(e["figures"]) for e in summary["experiments"].values())
    # The inline script ran after load and recorded every figure's decoded width.
    assert parsed.body.get("data-images") == str(n_figures)
    assert parsed.body.get("data-images-broken") == "0"
    assert n_figures >= len(summary["experiments"])
    for img in parsed.imgs:
        assert int(img["data-natural-width"]) > 0, img.get("alt")
    # The claims table: one row per claim, every column filled.
    ids = [c["id"] for c in summary["claims"]]
    assert [r[0] for r in parsed.rows] == ids
    for cid, cells in parsed.rows:
        assert len(cells) == 7, (cid, cells)
        assert all(cells), (cid, cells)
        assert cells[-1] in VERDICTS, (cid, cells[-1])
        assert re.search(r"\d", cells[4]), (cid, cells[4])  # measured +- error
    # Every experiment has its section, and every erratum its row.
    for name in summary["experiments"]:
        assert f'id="exp-{name}"' in dom
    assert dom.count('class="erratum-row"') == 9
