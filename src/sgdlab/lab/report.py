"""The report: ``DIR/index.html``, built from saved results only.

Self-contained: figures are embedded as base64 PNG data URIs, so the file can be mailed or
opened from anywhere. Order:

1. a one-screen summary: the lecture's claims grouped by its sections (verdict counts, links),
   the lecture's errata each with the measurement that settles it and a link to its figure,
   and the headline findings (where the lecture's rules hold, where they stop);
2. a table of contents;
3. one section per experiment: its paragraph, figures (lazy-loaded, at most page width), its
   claims (the tolerance split into statistical / grid / model parts when recorded, and the
   number of seeds), the points it left out with why, and how it was run;
4. the errata in full.

A figure listed in an experiment's ``results.json`` but missing on disk is redrawn from the
saved measurements by the experiment's ``plot`` function before it is embedded. Records older
than the tolerance parts, ``seeds``, ``dropped`` or ``curves`` are shown without them.

A results directory is untrusted input (a user can edit any results.json): every value that
reaches the page is HTML-escaped (quotes included), class names come from a fixed set and
links only point inside the page. A results.json that cannot be used
(:func:`~sgdlab.lab.results.load_result`) is listed with why and skipped; the other experiments
are reported as usual.
"""

from __future__ import annotations

import base64
import html
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import registry
from .atomic import atomic_write_text
from .claims import VERDICTS
from .lock import output_lock
from .results import FIGURE_NAME, collect, draw_figures, load_result, write_curves

__all__ = ["LECTURE_SECTIONS", "build_report", "format_number"]

# The lecture's sections (its slide groups) and the experiments that measure their claims.
LECTURE_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Vanilla SGD, convergence theorem", ("one_d", "convergence")),
    ("Running averages, momentum", ("running_averages", "momentum")),
    ("Conjugacy, batch-size scaling", ("conjugacy", "batch_scaling")),
    ("RMSProp, Adam", ("invariant_adam", "rmsprop_power", "adam_bias")),
    ("Gradient flow, converged loss", ("gradient_flow", "slope")),
    ("Langevin, SGD as MCMC", ("langevin_1d", "two_temperatures", "mcmc")),
    ("Beyond the lecture", ("critical_batch", "data_parallel")),
)

DOCS = "docs/lab.md"  # the repository's page of errata and closed forms the report cites

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;
margin:0 auto;padding:.5em 1em 2em;color:#222;line-height:1.4}
h1{font-size:1.35em;margin:.3em 0}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em}h3{font-size:1em;margin:.2em 0}
table{border-collapse:collapse;width:100%;font-size:.86em;margin:.8em 0}
th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left;
overflow-wrap:anywhere}
th{background:#f3f3f3}td.num{text-align:right;font-family:ui-monospace,monospace;white-space:nowrap}
code{font-family:ui-monospace,monospace;font-size:.95em}
a{color:#1a5fb4}
.v-agrees{background:#e5f6e5}.v-disagrees{background:#fbe0e0}
.v-lecture-corrected{background:#fff4d6}.v-inconclusive{background:#eeeeee}
.fig{display:block;max-width:100%;height:auto;border:1px solid #eee;margin:.5em 0}
figure{margin:1em 0}
.meta{color:#666;font-size:.85em}.summary span{margin-right:1.5em}
.intro{margin:.2em 0 .4em;font-size:.85em}#summary .summary{margin:.3em 0}
.overview{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:.3em 1.2em;
font-size:.78em}
.overview table{font-size:1em;margin:.2em 0}.overview td,.overview th{padding:1px 4px}
.overview ul{margin:.2em 0;padding-left:1.2em}.overview li{margin:0}
.toc{font-size:.8em;border-top:1px solid #ccc;border-bottom:1px solid #ccc;padding:.2em 0}
.toc ul{columns:3;margin:.2em 0;padding-left:0;list-style:none}.toc li{break-inside:avoid}
"""


# After the page has loaded (the first screen first: the figures are lazy), the figures further
# down are loaded too and each is marked with its decoded width, so that a headless browser's
# DOM dump shows whether every figure rendered (data-natural-width > 0).
_IMG_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  imgs.forEach(function (im) { im.loading = 'eager'; });
  var tries = 0;
  (function mark() {
    var waiting = imgs.filter(function (im) { return !im.complete; }).length;
    if (waiting > 0 && tries < 200) { tries += 1; setTimeout(mark, 50); return; }
    var bad = 0;
    imgs.forEach(function (im) {
      im.setAttribute('data-natural-width', String(im.naturalWidth));
      if (!(im.complete && im.naturalWidth > 0)) { bad += 1; }
    });
    document.body.setAttribute('data-images', String(imgs.length));
    document.body.setAttribute('data-images-broken', String(bad));
  })();
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


def _num(x: Any) -> float:
    """``x`` as a float (nan for a marker string or anything else)."""
    if isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _vclass(verdict: Any) -> str:
    """The row's CSS class: one of the known verdicts' classes, ``v-unknown`` for anything else
    (the verdict is read from a results.json, which a user can edit)."""
    if isinstance(verdict, str) and verdict in VERDICTS:
        return "v-" + verdict.replace(" ", "-")
    return "v-unknown"


def _claim_anchor(cid: Any) -> str:
    return f"claim-{cid}"


def _measured(c: dict[str, Any]) -> str:
    """The measurement with its standard error; an exact claim (no s.e.) says so."""
    m = _e(format_number(c["measured"]))
    se = _num(c["stderr"])
    seeds = c.get("seeds")
    runs = f", {_e(seeds)} seeds" if isinstance(seeds, int) and seeds > 1 else ""
    if not math.isfinite(se):
        return f"{m} <span class='meta'>(one run, no s.e.)</span>"
    if se == 0:
        return f"{m} <span class='meta'>(deterministic)</span>"
    return f"{m} &plusmn; {_e(format_number(se))}<span class='meta'> s.e.{runs}</span>"


def _predicted(c: dict[str, Any]) -> str:
    op = {"equal": "", "at_most": "&le; ", "at_least": "&ge; "}.get(c.get("kind", "equal"), "")
    s = op + _e(format_number(c["predicted"]))
    if c.get("lecture_value") is not None:
        s += f"<br><span class='meta'>lecture: {_e(format_number(c['lecture_value']))}</span>"
    return s


_PARTS = (("tol_statistical", "statistical"), ("tol_grid", "grid"), ("tol_model", "model"))


def _has_parts(claims: Iterable[dict[str, Any]]) -> bool:
    return any(any(c.get(k) is not None for k, _ in _PARTS) for c in claims)


def _claim_rows(claims: list[dict[str, Any]], parts: bool) -> str:
    rows = []
    for c in claims:
        formula = _e(c["formula"])
        if c.get("lecture_formula"):
            formula += f"<br><span class='meta'>lecture: {_e(c['lecture_formula'])}</span>"
        note = f"<br><span class='meta'>{_e(c['note'])}</span>" if c.get("note") else ""
        effect = ""
        if c.get("effect") is not None:
            effect = f"<br><span class='meta'>effect tested: {_e(format_number(c['effect']))}"
            effect += "</span>"
        cells = [
            f"<td><code>{_e(c['id'])}</code><br>{_e(c['statement'])}{note}</td>",
            f"<td>{formula}</td>",
            f"<td class='num'>{_predicted(c)}</td>",
            f"<td class='num'>{_measured(c)}</td>",
            f"<td class='num'>{_e(format_number(c['tolerance']))}{effect}</td>",
        ]
        if parts:
            cells += [f"<td class='num'>{_e(format_number(c.get(k)))}</td>" for k, _ in _PARTS]
        seeds = c.get("seeds")
        cells.append(f"<td class='num'>{_e(seeds) if seeds is not None else ''}</td>")
        cells.append(f"<td class='verdict'>{_e(c['verdict'])}</td>")
        rows.append(
            f"<tr class='claim-row {_vclass(c['verdict'])}' id='{_e(_claim_anchor(c['id']))}' "
            f"data-claim='{_e(c['id'])}'>" + "".join(cells) + "</tr>"
        )
    return "\n".join(rows)


def _claims_table(claims: list[dict[str, Any]], table_id: str) -> str:
    parts = _has_parts(claims)
    heads = [
        "claim",
        "formula (the lecture's, corrected where it errs)",
        "predicted",
        "measured",
        "tolerance",
    ]
    if parts:
        heads += [f"&plusmn; {label}" for _, label in _PARTS]
    heads += ["seeds", "verdict"]
    return (
        f"<table id='{_e(table_id)}' class='claims'><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in heads)
        + "</tr></thead><tbody>"
        + _claim_rows(claims, parts)
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


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _figure_anchor(name: str, i: int) -> str:
    return f"fig-{name}-{i}"


def _figure_html(expdir: Path, name: Any, rec: dict[str, Any], mod: Any, anchor: str) -> str:
    """The figure embedded as a data URI, lazy, at most page width; a missing one is redrawn
    from the saved measurements, one that may not be embedded (:func:`_figure_problem`) is
    named and skipped."""
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
    raw = path.read_bytes()
    size = _png_size(raw)
    dims = f" width='{size[0]}' height='{size[1]}'" if size else ""
    data = base64.b64encode(raw).decode("ascii")
    return (
        f"<figure id='{_e(anchor)}'><img class='fig' loading='lazy' decoding='async'{dims} "
        f"alt='{_e(name)}' src='data:image/png;base64,{data}'>"
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


def _tally(claims: Iterable[dict[str, Any]]) -> dict[str, int]:
    claims = list(claims)
    tally = {
        v: sum(c["verdict"] == v for c in claims)
        for v in ("agrees", "lecture corrected", "disagrees", "inconclusive")
    }
    if not tally["inconclusive"]:
        del tally["inconclusive"]  # shown only where there is one
    return tally


def _sections(experiments: Iterable[str]) -> list[tuple[str, list[str]]]:
    """The lecture's sections with the experiments present here (others last)."""
    present = list(experiments)
    out = [(title, [n for n in names if n in present]) for title, names in LECTURE_SECTIONS]
    placed = {n for _, names in out for n in names}
    rest = [n for n in present if n not in placed]
    if rest:
        out.append(("Other experiments", rest))
    return [(t, names) for t, names in out if names]


def _link(anchor: str, text: str) -> str:
    return f"<a href='#{_e(anchor)}'>{text}</a>"


def _summary_sections(summary: dict[str, Any]) -> str:
    rows = []
    for title, names in _sections(summary["experiments"]):
        claims = [c for c in summary["claims"] if c["experiment"] in names]
        t = _tally(claims)
        links = ", ".join(_link(f"exp-{n}", _e(n)) for n in names)
        rows.append(
            f"<tr><td>{_e(title)}: <span class='meta'>{links}</span></td>"
            f"<td class='num'>{t['agrees']}</td><td class='num'>{t['lecture corrected']}</td>"
            f"<td class='num'>{t['disagrees']}</td></tr>"
        )
    return (
        "<div><h3>The lecture's claims, by section</h3><table><thead><tr><th>section: "
        "experiments</th><th>agrees</th><th>corrected</th><th>disagrees</th></tr>"
        "</thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )


def _first_figure(summary: dict[str, Any], experiment: Any) -> str | None:
    exp = summary["experiments"].get(experiment)
    if exp and exp["figures"]:
        return _figure_anchor(str(experiment), 0)
    return None


def _summary_errata(summary: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    rows = []
    for e in summary["errata"]:
        settled = []
        for cid in e["settled_by"][:1]:  # the first: the one that settles it; all in the table
            c = by_id[cid]
            fig = _first_figure(summary, c["experiment"])
            settled.append(
                _link(
                    _claim_anchor(cid),
                    f"{_e(format_number(c['measured']))} vs {_e(format_number(c['predicted']))}",
                )
                + f" <b>{_e(c['verdict'])}</b>"
                + (f" ({_link(fig, 'figure')})" if fig else "")
            )
        if not settled:
            settled.append("<span class='meta'>not run here</span>")
        rows.append(
            f"<tr><td>{e['number']}</td><td>{_e(e['slide'])}</td><td><code>"
            f"{_e(e['as_written'])}</code></td><td>{''.join(settled)}</td></tr>"
        )
    return (
        "<div><h3>" + _link("errata", "Errata of the lecture") + " (measured vs corrected)</h3>"
        "<table><thead><tr><th>#</th><th>slide</th><th>as written</th><th>settled by</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )


def _summary_findings(summary: dict[str, Any]) -> str:
    holds, stops = [], []
    for title, names in _sections(summary["experiments"]):
        claims = [c for c in summary["claims"] if c["experiment"] in names]
        bad = [
            c for c in claims if c["verdict"] != "agrees" and c["verdict"] != "lecture corrected"
        ]
        if claims and not bad:
            holds.append(f"{_e(title)} ({len(claims)})")
        for c in bad:
            stops.append(
                _link(_claim_anchor(c["id"]), f"<code>{_e(c['id'])}</code>")
                + f": predicted {_e(format_number(c['predicted']))}, measured "
                f"{_e(format_number(c['measured']))}"
            )
    for name, exp in summary["experiments"].items():
        for d in exp.get("dropped", []):
            stops.append(
                _link(f"dropped-{name}", f"{_e(name)}: {_e(d['point'])} left out")
                + f" ({_e(d['reason'])})"
            )
    more = ""
    if len(stops) > 8:
        more = f"<li>and {len(stops) - 8} more, marked in their sections</li>"
    return (
        "<div><h3>Headline findings</h3><b>The rules hold</b> (every claim "
        "within its tolerance) in: " + ("; ".join(holds) or "none") + ".<br><b>Where they stop"
        "</b> (a measurement outside its tolerance, a point left out):<ul>"
        + ("".join(f"<li>{s}</li>" for s in stops[:8]) or "<li>nowhere measured here</li>")
        + more
        + "</ul></div>"
    )


def _toc(summary: dict[str, Any]) -> str:
    items = [_link("summary", "Summary")]
    items += [_link(f"exp-{n}", _e(e["title"])) for n, e in summary["experiments"].items()]
    items.append(_link("errata", "Errata in full"))
    if summary["damaged"]:
        items.append(_link("damaged", "Results that could not be read"))
    return (
        "<nav id='toc' class='toc'><b>Contents</b><ul>"
        + "".join(f"<li>{i}</li>" for i in items)
        + "</ul></nav>"
    )


def _dropped_html(name: str, dropped: list[dict[str, str]]) -> str:
    if not dropped:
        return ""
    return (
        f"<div id='dropped-{_e(name)}'><h3>Points left out</h3><ul class='dropped'>"
        + "".join(f"<li><b>{_e(d['point'])}</b>: {_e(d['reason'])}</li>" for d in dropped)
        + "</ul></div>"
    )


def _experiment_html(out: Path, name: str) -> list[str]:
    expdir = out / name
    rec = load_result(expdir)  # collect() read it under the same lock
    mod = registry.get(name)
    meta = rec["meta"]
    tally = _tally(rec["claims"])
    parts = [
        f"<section id='exp-{_e(name)}'><h2>{_e(rec['title'])}</h2>",
        f"<p>{_e(rec['description'])}</p>",
        "<p class='summary'>Measured here: "
        + ", ".join(f"<b>{n}</b> {_e(v)}" for v, n in tally.items() if n)
        + (" &mdash; see the rows marked <i>disagrees</i> below." if tally["disagrees"] else ".")
        + "</p>",
    ]
    parts.extend(
        _figure_html(expdir, f, rec, mod, _figure_anchor(name, i))
        for i, f in enumerate(rec["figures"])
    )
    own = [{"experiment": name, **c} for c in rec["claims"]]
    parts.append(_claims_table(own, f"claims-{name}"))
    parts.append(_dropped_html(name, rec.get("dropped", [])))
    parts.append(
        f"<p class='meta'>preset {_e(meta['preset'])}, seed {_e(meta['seed'])}, device "
        f"{_e(meta['device'])}, wall time {meta['wall_time_s']:.1f} s, sgdlab "
        f"{_e(meta.get('sgdlab'))}, torch {_e(meta.get('torch'))}, numpy "
        f"{_e(meta.get('numpy'))}, commit {_e(meta.get('git_commit') or 'n/a')}. Config: "
        f"<code>{_e(rec['config'])}</code>. {_link('toc', 'Contents')}</p></section>"
    )
    write_curves(expdir, rec)
    return parts


def _errata_html(summary: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    rows = []
    for e in summary["errata"]:
        settled = []
        for cid in e["settled_by"]:
            c = by_id[cid]
            fig = _first_figure(summary, c["experiment"])
            settled.append(
                _link(_claim_anchor(cid), f"<code>{_e(cid)}</code>")
                + f": predicted {_predicted(c)}, measured {_measured(c)} &rarr; "
                f"<b>{_e(c['verdict'])}</b>" + (f" ({_link(fig, 'figure')})" if fig else "")
            )
        for cid in e["missing"]:
            settled.append(f"<code>{_e(cid)}</code>: not run in this directory")
        rows.append(
            f"<tr class='erratum-row'><td>{e['number']}</td><td>{_e(e['slide'])}</td>"
            f"<td>{_e(e['as_written'])}</td><td>{_e(e['correct'])}</td>"
            f"<td>{'<br>'.join(settled)}</td></tr>"
        )
    return (
        "<section id='errata'><h2>Errata of the lecture</h2><table id='errata-table'><thead>"
        "<tr><th>#</th><th>slide</th><th>as written</th><th>correct</th><th>settled by "
        "(measured vs predicted)</th></tr></thead><tbody>"
        + "".join(rows)
        + f"</tbody></table><p class='meta'>The derivations: <code>{DOCS}</code> in the sgdlab "
        f"repository. {_link('toc', 'Contents')}</p></section>"
    )


def build_report(out: str | os.PathLike[str]) -> Path:
    """Write ``out/index.html`` (and each experiment's ``curves/*.csv``) from the saved results
    under ``out``; return the page's path.

    Holds the lock of ``out`` (:mod:`sgdlab.lab.lock`): a run writing there is not read half-way.
    """
    with output_lock(out):
        return _build_report(Path(out))


def _build_report(out: Path) -> Path:
    summary = collect(out)
    claims = summary["claims"]
    by_id = {c["id"]: c for c in claims}
    counts = _tally(claims)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>sgdlab: the lecture measured</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>SGD lecture, every claim measured against its closed form</h1>",
        "<p class='intro'>Each claim of the lecture (TTIC 31230, <i>Stochastic Gradient "
        f"Descent</i>) or its corrected form (errata and closed forms: <code>{DOCS}</code> in "
        "the sgdlab repository) against a measurement. <b>agrees</b>: |measured &minus; "
        "predicted| &le; tolerance (k standard errors + grid resolution + stated model error); "
        "<b>lecture corrected</b>: an erratum, the measurement agrees with the correction; "
        "<b>disagrees</b> otherwise.</p>",
        "<section id='summary'><p class='summary'>"
        + "".join(f"<span>{_e(k)}: <b>{v}</b></span>" for k, v in counts.items())
        + f"<span>experiments: <b>{len(summary['experiments'])}</b></span></p>",
        "<div class='overview'><div>",
        _summary_sections(summary),
        _summary_findings(summary),
        "</div>",
        _summary_errata(summary, by_id),
        "</div></section>",
        _toc(summary),
        _damaged_html(summary["damaged"]),
    ]
    for name in summary["experiments"]:
        parts.extend(_experiment_html(out, name))
    parts.append(_errata_html(summary, by_id))
    parts.append(
        f"<p class='meta'>Built {_e(summary['created_at'])} from {_e(out / 'results.json')}; "
        f"sgdlab {_e(summary['meta']['sgdlab'])}, torch {_e(summary['meta']['torch'])}.</p>"
    )
    parts.append(_IMG_CHECK)
    parts.append("</body></html>\n")
    path = out / "index.html"
    atomic_write_text(path, "\n".join(parts))
    return path
