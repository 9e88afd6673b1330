"""A results directory is untrusted input: a user can edit any results.json. The report escapes
every value that reaches HTML and restricts class names to the known verdicts."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from sgdlab.lab import build_report

PAYLOADS = (
    "x'><script>alert(1)</script>",
    'x" onmouseover="alert(2)',
    "x' onload='alert(3)",
    "</code></p><img src=x onerror=alert(4)>",
    "agrees' style='display:none",
)

# Every attribute the report writes (the figure check script adds data-* ones in a browser).
ALLOWED_ATTRS = {
    "lang",
    "charset",
    "name",
    "content",
    "id",
    "class",
    "data-claim",
    "alt",
    "src",
    "href",
    "loading",
    "decoding",
    "width",
    "height",
}
ALLOWED_CLASSES = {
    "claims",
    "claim-row",
    "v-agrees",
    "v-disagrees",
    "v-lecture-corrected",
    "v-unknown",
    "verdict",
    "num",
    "meta",
    "summary",
    "fig",
    "erratum-row",
    "damaged",
    "dropped",
    "intro",
    "overview",
    "toc",
}


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def check_no_injection(page: str) -> None:
    """One script element (the report's own figure check), known attributes and classes only,
    no payload text outside escaped form."""
    parser = _Tags()
    parser.feed(page)
    scripts = [t for t, _ in parser.tags if t == "script"]
    assert len(scripts) == 1, "a <script> element was injected"
    for tag, attrs in parser.tags:
        for key, value in attrs:
            assert key in ALLOWED_ATTRS, f"attribute {key!r} injected into <{tag}>"
            if key == "class":
                assert set((value or "").split()) <= ALLOWED_CLASSES, value
            if key == "href":
                assert (value or "").startswith("#"), value  # links stay inside the page
            if key in ("width", "height"):
                assert (value or "").isdigit(), value
            if key == "src":
                assert (value or "").startswith("data:image/png;base64,"), value
    assert "alert(" not in "".join(_text_of_scripts(page))
    for bad in ("<script>alert", "<img src=x"):  # raw markup of a payload
        assert bad not in page


def _text_of_scripts(page: str) -> list[str]:
    parts = page.split("<script>")[1:]
    return [p.split("</script>")[0] for p in parts]


def _poison(obj: Any, payloads: list[str], skip: tuple[str, ...] = ()) -> Any:
    """Every string value (not the keys) replaced by a payload, cycling through them."""
    if isinstance(obj, dict):
        return {k: v if k in skip else _poison(v, payloads, skip) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_poison(v, payloads, skip) for v in obj]
    if isinstance(obj, str):
        payloads.append(payloads.pop(0))
        return payloads[-1]
    return obj


def test_every_string_of_a_results_file_is_escaped(out: Path) -> None:
    path = out / "one_d" / "results.json"
    rec = json.loads(path.read_text())
    rec = _poison(rec, list(PAYLOADS), skip=("measurements", "figures"))
    assert rec["claims"][0]["verdict"] in PAYLOADS and rec["title"] in PAYLOADS
    path.write_text(json.dumps(rec))
    page = build_report(out).read_text()
    check_no_injection(page)
    # the figure names and the measurements too (a figure missing on disk is redrawn from them)
    for p in (out / "one_d").glob("*.png"):
        p.unlink()
    for skip in (("figures",), ()):
        path.write_text(json.dumps(_poison(rec, list(PAYLOADS), skip=skip)))
        check_no_injection(build_report(out).read_text())
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text


@pytest.mark.parametrize("payload", PAYLOADS)
def test_verdict_payload_cannot_leave_the_class_attribute(out: Path, payload: str) -> None:
    path = out / "one_d" / "results.json"
    rec = json.loads(path.read_text())
    for c in rec["claims"]:
        c["verdict"] = payload
    path.write_text(json.dumps(rec))
    page = build_report(out).read_text()
    check_no_injection(page)
    assert "class='claim-row v-unknown'" in page


def _set_figures(out: Path, figures: list[Any]) -> None:
    path = out / "one_d" / "results.json"
    rec = json.loads(path.read_text())
    rec["figures"] = figures
    path.write_text(json.dumps(rec))


def test_figures_outside_the_experiment_directory_are_skipped(
    out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Absolute paths, ``..``, links pointing out, other file types: named and skipped."""
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\n" + b"TOP-SECRET" * 50)
    (out / "secret.png").write_bytes(secret.read_bytes())
    (out / "one_d" / "link.png").symlink_to(secret)
    (out / "one_d" / "text.png").write_text("TOP-SECRET plain text")
    (out / "one_d" / "sub.png").mkdir()
    rec = json.loads((out / "one_d" / "results.json").read_text())
    good = rec["figures"][0]
    bad = [
        str(secret),
        "/etc/passwd",
        "../secret.png",
        "../../secret.png",
        "link.png",
        "text.png",
        "config.json",
        "sub.png",
        ".hidden.png",
        "a/b.png",
        "",
    ]
    _set_figures(out, [*bad, good])
    page = build_report(out).read_text()
    check_no_injection(page)
    leaked = {
        base64.b64encode(secret.read_bytes()).decode()[:40],
        base64.b64encode(Path("/etc/passwd").read_bytes()).decode()[:40],
        base64.b64encode(b"TOP-SECRET plain text").decode()[:20],
    }
    for piece in leaked:
        assert piece not in page
    assert page.count("<img ") == 1  # the experiment's own figure only
    err = capsys.readouterr().err
    for name in bad:
        assert f"figure {name!r} skipped" in err
    assert page.count(" skipped: ") == len(bad)
    assert secret.read_bytes().startswith(b"\x89PNG")  # nothing written through the link
