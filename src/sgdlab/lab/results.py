"""Saved results: reading and checking ``results.json`` files, collecting their claims, drawing
figures from saved measurements and exporting saved curves.

Shared by :mod:`sgdlab.lab.runner` (which writes results) and :mod:`sgdlab.lab.report` (which
reads them); neither imports the other's module at import time through this one, so the lab has
no import circle. The layout of a results directory is described in :mod:`sgdlab.lab.runner`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import registry
from .atomic import (
    TMP_PREFIX,
    WriteError,
    atomic_write_json,
    atomic_write_text,
    read_json,
    to_jsonable,
)
from .config import config_to_dict
from .errata import ERRATA
from .lock import output_lock

__all__ = [
    "FIGURE_NAME",
    "DamagedResultError",
    "collect",
    "draw_figures",
    "is_finished",
    "load_result",
    "remove_orphan_figures",
    "run_metadata",
    "write_curves",
]


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_metadata(device: str) -> dict[str, Any]:
    """Versions, platform and git commit recorded with every run."""
    import numpy
    import torch

    import sgdlab

    meta: dict[str, Any] = {
        "sgdlab": sgdlab.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        meta["cuda_device"] = torch.cuda.get_device_name(0)
    for extra in ("scipy", "matplotlib", "sklearn"):
        try:
            meta[extra] = __import__(extra).__version__
        except ImportError:
            pass
    return meta


# A figure's file name: ``STEM.png`` as the experiment's ``plot`` names it, saved as
# ``STEM.TAG.png`` with TAG the first 12 hex digits of the sha256 of its record.
FIGURE_NAME = re.compile(r"(?P<stem>[A-Za-z0-9_][A-Za-z0-9_-]*)(?:\.(?P<tag>[0-9a-f]{12}))?\.png")


def _record_tag(record: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of ``record`` (as saved, without its figures)."""
    body = {k: v for k, v in record.items() if k != "figures"}
    text = json.dumps(to_jsonable(body), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def draw_figures(
    mod: Any, measurements: Any, expdir: Path, tag: str, only: str | None = None
) -> list[str]:
    """Draw ``mod``'s figures of ``measurements`` and move each into ``expdir`` as
    ``STEM.TAG.png`` (``STEM.png`` for an empty tag); return those names (``only``: move just
    the figure saved as that name).

    The figures are drawn in a temporary directory inside ``expdir`` (removed afterwards), so a
    figure of the committed record is never overwritten by one of another record.
    """
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-figures.", dir=expdir))
    except OSError as exc:
        raise WriteError.of(expdir, exc) from exc
    try:
        names = []
        for drawn in mod.plot(measurements, stage):
            m = FIGURE_NAME.fullmatch(drawn)
            if m is None or m["tag"] is not None:
                raise ValueError(f"{mod.NAME}: plot returned {drawn!r}, not a name STEM.png")
            name = f"{m['stem']}.{tag}.png" if tag else drawn
            if only is None or name == only:
                try:
                    os.replace(stage / drawn, expdir / name)
                except OSError as exc:
                    raise WriteError.of(expdir / name, exc) from exc
                names.append(name)
        return names
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_orphan_figures(expdir: Path) -> list[Path]:
    """Delete the tagged figures in ``expdir`` that its results.json does not name (left by a
    run killed before it committed); keep everything when results.json cannot be read."""
    path = expdir / "results.json"
    keep: set[str] = set()
    if path.exists():
        try:
            keep = set(read_json(path)["figures"])
        except (OSError, ValueError, KeyError, TypeError):
            return []
    removed = []
    for p in expdir.iterdir():
        m = FIGURE_NAME.fullmatch(p.name)
        if m and m["tag"] and p.name not in keep and not p.is_dir():
            p.unlink()
            removed.append(p)
    return removed


class DamagedResultError(ValueError):
    """A results.json that cannot be used (not JSON, not UTF-8, a field missing or of the
    wrong type, a link); the message says why. The experiment is reported and skipped."""


_NUMBER = (int, float, str, type(None))  # a claim's numbers: "nan"/"inf" markers, or none


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise DamagedResultError(why)


def _check_record(rec: Any) -> None:
    """Raise :class:`DamagedResultError` unless ``rec`` has the fields and types the report and
    the claims table read."""
    _check(isinstance(rec, dict), "not a JSON object")
    for key, tp in (
        ("title", str),
        ("description", str),
        ("config", dict),
        ("claims", list),
        ("figures", list),
        ("meta", dict),
    ):
        _check(isinstance(rec.get(key), tp), f"{key!r} missing or not a {tp.__name__}")
    meta = rec["meta"]
    for key in ("seed", "preset", "device"):
        _check(key in meta, f"meta {key!r} missing")
    wall = meta.get("wall_time_s")
    _check(
        isinstance(wall, int | float) and not isinstance(wall, bool),
        "meta 'wall_time_s' missing or not a number",
    )
    for i, c in enumerate(rec["claims"]):
        _check(isinstance(c, dict), f"claim {i} is not a JSON object")
        for key in ("id", "statement", "formula", "verdict"):
            _check(isinstance(c.get(key), str), f"claim {i}: {key!r} missing or not a string")
        for key in ("kind", "note", "lecture_formula"):
            _check(isinstance(c.get(key, ""), str), f"claim {i}: {key!r} is not a string")
        for key in ("predicted", "measured", "stderr", "tolerance", "lecture_value"):
            _check(isinstance(c.get(key), _NUMBER), f"claim {i}: {key!r} is not a number")
        # the tolerance's parts, effect size and seeds: absent from results older than them
        for key in ("tol_statistical", "tol_grid", "tol_model", "effect"):
            _check(isinstance(c.get(key), _NUMBER), f"claim {i}: {key!r} is not a number")
        seeds = c.get("seeds")
        _check(
            seeds is None or (isinstance(seeds, int) and not isinstance(seeds, bool)),
            f"claim {i}: 'seeds' is not an integer",
        )
    dropped = rec.get("dropped", [])
    _check(
        isinstance(dropped, list)
        and all(
            isinstance(d, dict)
            and isinstance(d.get("point"), str)
            and isinstance(d.get("reason"), str)
            for d in dropped
        ),
        "'dropped' is not a list of {point, reason} strings",
    )
    _check(isinstance(rec.get("curves", {}), dict), "'curves' is not a JSON object")


def load_result(expdir: str | os.PathLike[str]) -> dict[str, Any]:
    """The record in ``expdir/results.json``, checked (:func:`_check_record`); raises
    :class:`DamagedResultError` saying why it cannot be used. A link (the directory or the
    file) is refused: nothing outside the results directory is read."""
    expdir = Path(expdir)
    path = expdir / "results.json"
    _check(not expdir.is_symlink() and not path.is_symlink(), "a symbolic link")
    try:
        rec = read_json(path)
    except UnicodeDecodeError:
        raise DamagedResultError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DamagedResultError(f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise DamagedResultError("nested too deeply") from None
    except OSError as exc:
        raise DamagedResultError(f"cannot be read ({exc.strerror or exc})") from None
    _check_record(rec)
    return rec


def is_finished(expdir: str | os.PathLike[str], config: Any) -> bool:
    """True when ``expdir/results.json`` exists and records exactly ``config``."""
    if not (Path(expdir) / "results.json").is_file():
        return False
    try:
        saved = load_result(expdir)
    except DamagedResultError:
        return False  # run again: the new result replaces the damaged one
    return saved["config"] == to_jsonable(config_to_dict(config))


def collect(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Gather every finished experiment's claims into ``out/results.json`` and return it."""
    with output_lock(out):
        return _collect(Path(out))


def _collect(out: Path) -> dict[str, Any]:
    experiments: dict[str, Any] = {}
    claims: list[dict[str, Any]] = []
    damaged: list[dict[str, str]] = []
    for name in registry.names():
        path = out / name / "results.json"
        if not (path.is_file() or path.is_symlink()):
            continue
        try:
            rec = load_result(out / name)
        except DamagedResultError as exc:
            damaged.append({"experiment": name, "path": str(path), "why": str(exc)})
            continue
        experiments[name] = {
            "title": rec["title"],
            "figures": rec["figures"],
            "wall_time_s": rec["meta"]["wall_time_s"],
            "seed": rec["meta"]["seed"],
            "preset": rec["meta"]["preset"],
            "device": rec["meta"]["device"],
            "dropped": rec.get("dropped", []),
        }
        for c in rec["claims"]:
            claims.append({"experiment": name, **c})
    by_id = {c["id"]: c for c in claims}
    errata = []
    for e in ERRATA:
        ids = list(e.settled_by) + [
            c["id"] for c in claims if c.get("erratum") == e.number and c["id"] not in e.settled_by
        ]
        errata.append(
            {
                "number": e.number,
                "slide": e.slide,
                "as_written": e.as_written,
                "correct": e.correct,
                "settled_by": [i for i in ids if i in by_id],
                "missing": [i for i in ids if i not in by_id],
            }
        )
    summary = {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "experiments": experiments,
        "claims": claims,
        "errata": errata,
        "damaged": damaged,
        "meta": run_metadata(next(iter(experiments.values()))["device"] if experiments else "cpu"),
    }
    atomic_write_json(out / "results.json", summary)
    return summary


# A curve's name (a file stem) and the curves of a record, as the contract of results.json
# has them: {name: {"x_label", "y_label", "series": {label: {"x", "y", "yerr"}}}}.
CURVE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def _warn(message: str) -> None:
    import sys

    print(f"sgdlab: warning: {message}", file=sys.stderr)


def _curve_problem(name: Any, curve: Any) -> str | None:
    """Why the saved curve ``name`` cannot be exported, or None (a record is untrusted)."""
    if not isinstance(name, str) or CURVE_NAME.fullmatch(name) is None:
        return "not a curve name (letters, digits, _ and -)"
    if not isinstance(curve, dict) or not isinstance(curve.get("series"), dict):
        return "no 'series' object"
    for label, s in curve["series"].items():
        if (
            not isinstance(s, dict)
            or not isinstance(s.get("x"), list)
            or not isinstance(s.get("y"), list)
            or len(s["x"]) != len(s["y"])
        ):
            return f"series {label!r}: 'x' and 'y' must be lists of one length"
        yerr = s.get("yerr")
        if yerr is not None and not (isinstance(yerr, list) and len(yerr) == len(s["y"])):
            return f"series {label!r}: 'yerr' must be null or a list as long as 'y'"
    return None


def saved_curves(rec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The exportable curves of a record (those that cannot be are named on stderr)."""
    curves = rec.get("curves")
    if not isinstance(curves, dict):
        return {}
    out = {}
    for name, curve in curves.items():
        why = _curve_problem(name, curve)
        if why is None:
            out[name] = curve
        else:
            _warn(f"curve {name!r} not exported ({why})")
    return out


def _cell(v: Any) -> str:
    """A CSV cell: numbers as Python writes them (round-trip exact), null empty."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int | float):
        return repr(float(v)) if isinstance(v, float) else str(v)
    return _csv_text(str(v))


def _csv_text(text: str) -> str:
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def curve_csv(curve: Mapping[str, Any]) -> str:
    """One curve as CSV, one row per point: ``series,X_LABEL,Y_LABEL,yerr``."""
    x_label = str(curve.get("x_label") or "x")
    y_label = str(curve.get("y_label") or "y")
    lines = [",".join(_csv_text(h) for h in ("series", x_label, y_label, "yerr"))]
    for label, s in curve["series"].items():
        yerr = s.get("yerr") or [None] * len(s["y"])
        for x, y, e in zip(s["x"], s["y"], yerr, strict=True):
            lines.append(",".join((_csv_text(str(label)), _cell(x), _cell(y), _cell(e))))
    return "\n".join(lines) + "\n"


def write_curves(expdir: Path, rec: Mapping[str, Any]) -> list[Path]:
    """Write each saved curve of ``rec`` as ``expdir/curves/NAME.csv`` (atomically) and remove
    the CSV files there of curves the record no longer has; nothing for a record without
    ``curves`` (results older than the field)."""
    curves = saved_curves(rec)
    cdir = Path(expdir) / "curves"
    written = []
    if curves:
        try:
            cdir.mkdir(exist_ok=True)
        except OSError as exc:
            raise WriteError.of(cdir, exc) from exc
        for name, curve in curves.items():
            atomic_write_text(cdir / f"{name}.csv", curve_csv(curve))
            written.append(cdir / f"{name}.csv")
    if cdir.is_dir() and not cdir.is_symlink():
        for p in cdir.glob("*.csv"):
            if p not in written and p.is_file():
                p.unlink()
    return written


def require_tensorboard() -> None:
    """Raise :class:`~sgdlab.lab.config.ConfigError` unless tensorboard can be imported."""
    from .config import ConfigError

    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'sgdlab[integrations]')"
        ) from None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def write_tensorboard(out: str | os.PathLike[str], logdir: str | os.PathLike[str]) -> int:
    """Write every saved curve under ``out`` as TensorBoard scalars in ``logdir``; return how
    many curves were written.

    One run per experiment (``logdir/<experiment>``), tag ``CURVE/SERIES`` for y, and
    ``CURVE/SERIES/yerr`` for its error bars. The step is x when every x of the series is an
    integer (a step count, a batch size); otherwise the point's index, with x itself logged as
    ``CURVE/SERIES/x`` at the same steps. Non-finite values are left out.
    """
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    out = Path(out)
    written = 0
    for name in registry.names():
        try:
            rec = load_result(out / name)
        except DamagedResultError:
            continue
        curves = saved_curves(rec)
        if not curves:
            continue
        writer = SummaryWriter(log_dir=str(Path(logdir) / name))
        try:
            for cname, curve in curves.items():
                for label, s in curve["series"].items():
                    _write_series(writer, f"{cname}/{label}", s)
                written += 1
        finally:
            writer.close()
    return written


def _write_series(writer: Any, tag: str, s: Mapping[str, Any]) -> None:
    xs, ys = s["x"], s["y"]
    yerr = s.get("yerr") or [None] * len(ys)
    integer_x = all(_finite(x) and float(x).is_integer() for x in xs)
    for i, (x, y, e) in enumerate(zip(xs, ys, yerr, strict=True)):
        step = int(x) if integer_x else i
        if _finite(y):
            writer.add_scalar(tag, float(y), step)
        if _finite(e):
            writer.add_scalar(f"{tag}/yerr", float(e), step)
        if not integer_x and _finite(x):
            writer.add_scalar(f"{tag}/x", float(x), step)
