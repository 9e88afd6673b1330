"""The report: ``DIR/index.html``, built from saved results only.

Self-contained: figures are embedded as base64 PNG data URIs, so the file can be mailed or
opened from anywhere. Order: the claims table (claim, the formula checked, predicted, measured
+- standard error, tolerance, verdict), a section per experiment (its paragraph, figures and
claims), then the lecture's errata each with the measurement that settles it.

A figure listed in an experiment's ``results.json`` but missing on disk is redrawn from the
saved measurements by the experiment's ``plot`` function before it is embedded.

A results directory is untrusted input (a user can edit any results.json): every value that
reaches the page is HTML-escaped (quotes included) and class names come from a fixed set. A
results.json that cannot be used (:func:`~sgdlab.lab.runner.load_result`) is listed with why
and skipped; the other experiments are reported as usual.
"""

from __future__ import annotations

import base64
import html
import math
import os
import sys
from pathlib import Path
from typing import Any

from . import registry
from .atomic import atomic_write_text
from .claims import VERDICTS
from .lock import output_lock
from .runner import FIGURE_NAME, collect, draw_figures, load_result

__all__ = ["build_report", "format_number"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;width:100%;font-size:.88em;margin:1em 0}
th,td{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-family:ui-monospace,monospace;white-space:nowrap}
code{font-family:ui-monospace,monospace;font-size:.95em}
.v-agrees{background:#e5f6e5}.v-disagrees{background:#fbe0e0}.v-lecture-corrected{background:#fff4d6}
.fig{max-width:100%;border:1px solid #eee;margin:.5em 0}
.meta{color:#666;font-size:.85em}.summary span{margin-right:1.5em}
"""


# Marks each figure with its decoded width once the page has loaded, so a headless browser's
# DOM dump shows whether every figure rendered (data-natural-width > 0).
_IMG_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var bad = 0;
  imgs.forEach(function (im) {
    im.setAttribute('data-natural-width', String(im.naturalWidth));
    if (!(im.complete && im.naturalWidth > 0)) { bad += 1; }
  });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-broken', String(bad));
});
</script>"""


def format_number(x: Any) -> str:
    """Compact numeric formatting (4 significant digits; strings pass through)."""
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if v == 0:
        return "0"
    if 1e-3 <= abs(v) < 1e4:
        return f"{v:.4g}"
    return f"{v:.3e}"


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _vclass(verdict: Any) -> str:
    """The row's CSS class: one of the known verdicts' classes, ``v-unknown`` for anything else
    (the verdict is read from a results.json, which a user can edit)."""
    if isinstance(verdict, str) and verdict in VERDICTS:
        return "v-" + verdict.replace(" ", "-")
    return "v-unknown"


def _pm(c: dict[str, Any]) -> str:
    se = c["stderr"]
    if isinstance(se, str) or se is None or not math.isfinite(float(se)):
        return f"{_e(format_number(c['measured']))} <span class='meta'>(one run, no s.e.)</span>"
    return f"{_e(format_number(c['measured']))} &plusmn; {_e(format_number(se))}"


def _predicted(c: dict[str, Any]) -> str:
    op = {"equal": "", "at_most": "&le; ", "at_least": "&ge; "}.get(c.get("kind", "equal"), "")
    s = op + _e(format_number(c["predicted"]))
    if c.get("lecture_value") is not None:
        s += f"<br><span class='meta'>lecture: {_e(format_number(c['lecture_value']))}</span>"
    return s


def _claim_rows(claims: list[dict[str, Any]], with_experiment: bool) -> str:
    rows = []
    for c in claims:
        formula = _e(c["formula"])
        if c.get("lecture_formula"):
            formula += f"<br><span class='meta'>lecture: {_e(c['lecture_formula'])}</span>"
        exp = f"<td>{_e(c['experiment'])}</td>" if with_experiment else ""
        note = f"<br><span class='meta'>{_e(c['note'])}</span>" if c.get("note") else ""
        rows.append(
            f"<tr class='claim-row {_vclass(c['verdict'])}' data-claim='{_e(c['id'])}'>"
            f"{exp}<td><code>{_e(c['id'])}</code><br>{_e(c['statement'])}{note}</td>"
            f"<td>{formula}</td><td class='num'>{_predicted(c)}</td>"
            f"<td class='num'>{_pm(c)}</td><td class='num'>{_e(format_number(c['tolerance']))}</td>"
            f"<td class='verdict'>{_e(c['verdict'])}</td></tr>"
        )
    return "\n".join(rows)


def _claims_table(claims: list[dict[str, Any]], table_id: str, with_experiment: bool) -> str:
    exp = "<th>experiment</th>" if with_experiment else ""
    return (
        f"<table id='{table_id}' class='claims'><thead><tr>{exp}<th>claim</th>"
        "<th>formula (the lecture's, corrected where it errs)</th><th>predicted</th>"
        "<th>measured &plusmn; s.e.</th>"
        "<th>tolerance</th><th>verdict</th></tr></thead><tbody>"
        + _claim_rows(claims, with_experiment)
        + "</tbody></table>"
    )


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure_problem(expdir: Path, name: Any) -> str | None:
    """Why ``name`` (from a results.json) may not be embedded, or None when it may: a plain
    file name ``STEM[.TAG].png`` of a regular PNG file (not a link) inside ``expdir``."""
    if not isinstance(name, str) or FIGURE_NAME.fullmatch(name) is None:
        return "not a figure name STEM.png inside the experiment directory"
    path = expdir / name
    if path.is_symlink():
        return "a symbolic link"
    if path.exists() and not path.is_file():
        return "not a regular file"
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(len(_PNG_MAGIC)) != _PNG_MAGIC:
                return "not a PNG image"
    return None


def _figure_html(expdir: Path, name: Any, rec: dict[str, Any], mod: Any) -> str:
    """The figure embedded as a data URI; a missing one is redrawn from the saved measurements,
    one that may not be embedded (:func:`_figure_problem`) is named and skipped."""
    why = _figure_problem(expdir, name)
    if why is not None:
        _warn(f"{expdir / 'results.json'}: figure {name!r} skipped ({why})")
        return f"<p class='meta'>figure {_e(name)} skipped: {_e(why)}</p>"
    path = expdir / name
    if not path.exists():
        m = FIGURE_NAME.fullmatch(name)
        try:
            draw_figures(mod, rec["measurements"], expdir, m["tag"] or "", only=name)
        except Exception as exc:  # the saved measurements are damaged: say so, draw the rest
            _warn(f"{expdir / 'results.json'}: figure {name!r} could not be drawn ({exc})")
        if _figure_problem(expdir, name) is not None or not path.is_file():
            return f"<p class='meta'>figure {_e(name)} could not be drawn</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f"<figure><img class='fig' alt='{_e(name)}' src='data:image/png;base64,{data}'>"
        f"<figcaption class='meta'>{_e(name)}</figcaption></figure>"
    )


def _damaged_html(damaged: list[dict[str, str]]) -> str:
    """The results that could not be used, each named with why (also on stderr)."""
    if not damaged:
        return ""
    items = []
    for d in damaged:
        _warn(f"{d['path']} skipped: {d['why']}")
        items.append(f"<li><code>{_e(d['path'])}</code>: {_e(d['why'])}</li>")
    return (
        "<h2 id='damaged'>Results that could not be read</h2><ul class='damaged'>"
        + "".join(items)
        + "</ul><p>Rerun those experiments (<code>sgdlab run NAME</code>) to replace them.</p>"
    )


def _warn(message: str) -> None:
    print(f"sgdlab: warning: {message}", file=sys.stderr)


def build_report(out: str | os.PathLike[str]) -> Path:
    """Write ``out/index.html`` from the saved results under ``out``; return its path.

    Holds the lock of ``out`` (:mod:`sgdlab.lab.lock`): a run writing there is not read half-way.
    """
    with output_lock(out):
        return _build_report(Path(out))


def _build_report(out: Path) -> Path:
    summary = collect(out)
    claims = summary["claims"]
    counts = {v: sum(c["verdict"] == v for c in claims) for v in
              ("agrees", "lecture corrected", "disagrees")}
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>sgdlab: the lecture measured</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>SGD lecture, every claim measured against its closed form</h1>",
        "<p>Each row compares a claim of the lecture (TTIC 31230, <i>Stochastic Gradient "
        "Descent</i>) or its corrected form (REFERENCE.md) with a measurement. Verdict: "
        "<b>agrees</b> when |measured &minus; predicted| &le; tolerance (4 standard errors plus "
        "any stated model error of a first-order formula); <b>lecture corrected</b> when the "
        "claim is one of the lecture's errata and the measurement agrees with the corrected "
        "value; <b>disagrees</b> otherwise.</p>",
        "<p class='summary'>"
        + "".join(f"<span>{_e(k)}: <b>{v}</b></span>" for k, v in counts.items())
        + f"<span>experiments: <b>{len(summary['experiments'])}</b></span></p>",
        _damaged_html(summary["damaged"]),
        "<h2 id='claims'>Claims</h2>",
        _claims_table(claims, "claims-table", with_experiment=True),
    ]
    for name in summary["experiments"]:
        expdir = out / name
        rec = load_result(expdir)  # collect() read it under the same lock
        mod = registry.get(name)
        meta = rec["meta"]
        parts.append(f"<h2 id='exp-{_e(name)}'>{_e(rec['title'])}</h2>")
        parts.append(f"<p>{_e(rec['description'])}</p>")
        tally = {v: sum(c["verdict"] == v for c in rec["claims"]) for v in
                 ("agrees", "lecture corrected", "disagrees")}
        parts.append(
            "<p class='summary'>Measured here: "
            + ", ".join(f"<b>{n}</b> {_e(v)}" for v, n in tally.items() if n)
            + (" &mdash; see the rows marked <i>disagrees</i> below." if tally["disagrees"]
               else ".")
            + "</p>"
        )
        parts.extend(_figure_html(expdir, f, rec, mod) for f in rec["figures"])
        own = [{"experiment": name, **c} for c in rec["claims"]]
        parts.append(_claims_table(own, f"claims-{name}", with_experiment=False))
        parts.append(
            f"<p class='meta'>preset {_e(meta['preset'])}, seed {_e(meta['seed'])}, device "
            f"{_e(meta['device'])}, wall time {meta['wall_time_s']:.1f} s, sgdlab "
            f"{_e(meta['sgdlab'])}, torch {_e(meta['torch'])}, numpy {_e(meta['numpy'])}, "
            f"commit {_e(meta.get('git_commit') or 'n/a')}. Config: "
            f"<code>{_e(rec['config'])}</code></p>"
        )
    by_id = {c["id"]: c for c in claims}
    parts.append("<h2 id='errata'>Errata of the lecture</h2>")
    parts.append(
        "<table id='errata-table'><thead><tr><th>#</th><th>slide</th><th>as written</th>"
        "<th>correct</th><th>settled by (measured vs predicted)</th></tr></thead><tbody>"
    )
    for e in summary["errata"]:
        settled = []
        for cid in e["settled_by"]:
            c = by_id[cid]
            settled.append(
                f"<code>{_e(cid)}</code>: predicted {_predicted(c)}, measured {_pm(c)} "
                f"&rarr; <b>{_e(c['verdict'])}</b>"
            )
        for cid in e["missing"]:
            settled.append(f"<code>{_e(cid)}</code>: not run in this directory")
        parts.append(
            f"<tr class='erratum-row'><td>{e['number']}</td><td>{_e(e['slide'])}</td>"
            f"<td>{_e(e['as_written'])}</td><td>{_e(e['correct'])}</td>"
            f"<td>{'<br>'.join(settled)}</td></tr>"
        )
    parts.append("</tbody></table>")
    parts.append(
        f"<p class='meta'>Built {summary['created_at']} from {_e(out / 'results.json')}; "
        f"sgdlab {_e(summary['meta']['sgdlab'])}, torch {_e(summary['meta']['torch'])}.</p>"
    )
    parts.append(_IMG_CHECK)
    parts.append("</body></html>\n")
    path = out / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path
