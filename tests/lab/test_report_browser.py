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


# Appended to a copy of the page: once the page's own check has decoded every figure, write the
# layout a reader sees at 1280x800 into the DOM (the dump then carries it).
_PROBE = """<script>
function sgdlabProbe() {
  if (!document.body.hasAttribute('data-images')) { setTimeout(sgdlabProbe, 100); return; }
  function box(el) {
    if (!el) { return null; }
    var r = el.getBoundingClientRect();
    return {top: r.top + window.scrollY, bottom: r.bottom + window.scrollY, right: r.right};
  }
  var links = Array.prototype.slice.call(document.querySelectorAll('a[href]'));
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  document.body.setAttribute('data-probe', JSON.stringify({
    viewport: [window.innerWidth, window.innerHeight],
    pageWidth: document.documentElement.clientWidth,
    scrollWidth: document.documentElement.scrollWidth,
    summary: box(document.getElementById('summary')),
    toc: box(document.getElementById('toc')),
    hrefs: links.map(function (a) { return a.getAttribute('href'); }),
    unresolved: links.filter(function (a) {
      var h = a.getAttribute('href');
      return !(h.charAt(0) === '#' && document.getElementById(h.slice(1)));
    }).map(function (a) { return a.getAttribute('href'); }),
    figures: imgs.map(function (im) { return box(im).right; })
  }));
}
window.addEventListener('load', sgdlabProbe);
</script>"""


class _Rows(HTMLParser):
    """Collect the claims tables' rows (data-claim id and the text of every cell), the images
    and the body's attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[str] = []
        self.rows: list[tuple[str, list[str]]] = []
        self.imgs: list[dict[str, str]] = []
        self.body: dict[str, str] = {}
        self._cell: list[str] | None = None
        self._in_claims = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if tag == "img":
            self.imgs.append(a)
        if tag == "table" and "claims" in a.get("class", "").split():
            self.tables.append(a.get("id", ""))
            self._in_claims = True
        if self._in_claims and tag == "tr" and "data-claim" in a:
            self.rows.append((a["data-claim"], []))
        if self._in_claims and tag == "td" and self.rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_claims = False
        if tag == "td" and self._cell is not None and self.rows:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_report_renders_in_chromium(tiny_run: Path, tmp_path: Path) -> None:
    """At 1280x800: the summary and the table of contents fill the first screen, every link
    lands on an element, no figure is wider than the page, every figure decodes; each claim is
    shown once, in its experiment's section."""
    exe = _chromium()
    page = (tiny_run / "index.html").read_text()
    probed = tmp_path / "index.html"
    probed.write_text(page.replace("</body>", _PROBE + "</body>"))
    url = probed.resolve().as_uri()
    base = [
        exe,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,800",
        "--hide-scrollbars",
    ]
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    shot = tmp_path / "report.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", (tiny_run / "index.html").resolve().as_uri()],
        capture_output=True,
        timeout=300,
        check=True,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000, "no screenshot written"

    parsed = _Rows()
    parsed.feed(dom)
    probe = json.loads(parsed.body["data-probe"])
    width, height = probe["viewport"]  # the window less the browser's own frame
    assert width == 1280 and 600 <= height <= 800
    # The first screen: the whole summary, and the table of contents starts on it.
    assert probe["summary"]["top"] < 200 and probe["summary"]["bottom"] <= height, probe
    assert probe["toc"]["top"] < height, probe
    # Every in-page link resolves; nothing is wider than the page.
    assert probe["hrefs"] and probe["unresolved"] == []
    assert probe["scrollWidth"] <= probe["pageWidth"]
    assert all(right <= probe["pageWidth"] for right in probe["figures"])

    summary = json.loads((tiny_run / "results.json").read_text())
    n_figures = sum(len(e["figures"]) for e in summary["experiments"].values())
    # The page's own check ran after load and recorded every figure's decoded width.
    assert parsed.body.get("data-images") == str(n_figures)
    assert parsed.body.get("data-images-broken") == "0"
    assert n_figures >= len(summary["experiments"])
    for img in parsed.imgs:
        assert int(img["data-natural-width"]) > 0, img.get("alt")
        assert img.get("loading") == "lazy" or img.get("loading") == "eager"
    assert page.count("loading='lazy'") == n_figures
    # One claims table per experiment, in its section; each claim shown once, cells filled.
    assert parsed.tables == [f"claims-{n}" for n in summary["experiments"]]
    ids = [c["id"] for c in summary["claims"]]
    assert [r[0] for r in parsed.rows] == ids
    for cid, cells in parsed.rows:
        assert cells[-1] in VERDICTS, (cid, cells)
        assert all(cells[:5]), (cid, cells)
        assert re.search(r"\d", cells[3]), (cid, cells[3])  # the measurement
    for name in summary["experiments"]:
        assert f'id="exp-{name}"' in dom and f'href="#exp-{name}"' in dom
    assert dom.count('class="erratum-row"') == 9
    # the intro cites the repository's docs page (shared/REFERENCE.md is not in the repository)
    intro = page.split("<p class='intro'>")[1].split("</p>")[0]
    assert "REFERENCE.md" not in intro and "docs/lab.md" in intro
    assert (Path(__file__).parents[2] / "docs" / "lab.md").is_file()
