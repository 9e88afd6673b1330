"""Run experiments into a results directory, resumably, and collect their claims.

Layout of a results directory ``DIR``::

    DIR/<experiment>/config.json     the typed config of the run
    DIR/<experiment>/results.json    measurements, claims, figures, metadata (written last)
    DIR/<experiment>/STEM.TAG.png    figures, drawn from the saved measurements
    DIR/results.json                 every claim of every finished experiment + errata
    DIR/index.html                   the report

An experiment is *finished* when its ``results.json`` exists and records the same config as the
one requested (a damaged one, :func:`load_result`, is not finished: it is run again, and skipped
with its reason by :func:`collect` and the report, never fatal to the others);
:func:`run_experiment` skips finished experiments unless ``force``. Every file is written
atomically (:mod:`sgdlab.lab.atomic`), so a run killed at any moment leaves finished
experiments intact and no half-written file.

A results.json and its figures are committed together: a figure's name carries ``TAG``, a hash
of the record it belongs to, and results.json (naming its figures) is written last. A run killed
between the two leaves the last finished results.json with its own figures, plus new figures no
results.json names; those orphans are deleted when the next run of the experiment starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from . import registry
from .atomic import (
    TMP_PREFIX,
    WriteError,
    atomic_write_json,
    from_jsonable,
    read_json,
    remove_stale_temporaries,
    to_jsonable,
)
from .config import build_config, config_to_dict
from .errata import ERRATA
from .lock import output_lock
from .progress import bar

__all__ = [
    "FIGURE_NAME",
    "DamagedResultError",
    "collect",
    "draw_figures",
    "is_finished",
    "load_result",
    "make_config",
    "reproduce",
    "run_experiment",
    "run_metadata",
]


def make_config(
    name: str,
    preset: str = "quick",
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> Any:
    """The typed config of experiment ``name`` (preset, then ``--set`` overrides, seed, device)."""
    mod = registry.get(name)
    merged = dict(overrides or {})
    if seed is not None:
        merged["seed"] = seed
    if device is not None:
        merged["device"] = device
    return build_config(mod.Config, mod.PRESETS, preset, merged)


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
    for key, tp in (("title", str), ("description", str), ("config", dict), ("claims", list),
                    ("figures", list), ("meta", dict)):
        _check(isinstance(rec.get(key), tp), f"{key!r} missing or not a {tp.__name__}")
    meta = rec["meta"]
    for key in ("seed", "preset", "device"):
        _check(key in meta, f"meta {key!r} missing")
    wall = meta.get("wall_time_s")
    _check(isinstance(wall, int | float) and not isinstance(wall, bool),
           "meta 'wall_time_s' missing or not a number")
    for i, c in enumerate(rec["claims"]):
        _check(isinstance(c, dict), f"claim {i} is not a JSON object")
        for key in ("id", "statement", "formula", "verdict"):
            _check(isinstance(c.get(key), str), f"claim {i}: {key!r} missing or not a string")
        for key in ("kind", "note", "lecture_formula"):
            _check(isinstance(c.get(key, ""), str), f"claim {i}: {key!r} is not a string")
        for key in ("predicted", "measured", "stderr", "tolerance", "lecture_value"):
            _check(isinstance(c.get(key), _NUMBER), f"claim {i}: {key!r} is not a number")


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


def _remove_stale(out: Path) -> None:
    """Under the lock of ``out``: the temporaries killed runs left in ``out`` and its data
    cache (each experiment directory is cleaned when the experiment starts)."""
    for d in (out, out / "_data"):
        remove_stale_temporaries(d)


def run_experiment(
    name: str,
    out: str | os.PathLike[str],
    preset: str = "quick",
    overrides: Mapping[str, Any] | None = None,
    seed: int | None = None,
    device: str | None = None,
    force: bool = False,
    collect_after: bool = True,
) -> dict[str, Any]:
    """Run one experiment into ``out/<name>`` unless finished; return a short summary.

    Holds the lock of ``out`` (:mod:`sgdlab.lab.lock`) and first removes the temporaries that
    killed runs left in ``out``; an invalid config fails before anything is written.
    """
    make_config(name, preset, overrides, seed, device)
    with output_lock(out):
        _remove_stale(Path(out))
        return _run_locked(name, out, preset, overrides, seed, device, force, collect_after)


def _run_locked(
    name: str,
    out: str | os.PathLike[str],
    preset: str,
    overrides: Mapping[str, Any] | None,
    seed: int | None,
    device: str | None,
    force: bool,
    collect_after: bool,
) -> dict[str, Any]:
    """:func:`run_experiment` under the lock of ``out`` (held by this process or its parent)."""
    mod = registry.get(name)
    config = make_config(name, preset, overrides, seed, device)
    expdir = Path(out) / name
    try:
        expdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError.of(expdir, exc) from exc
    remove_stale_temporaries(expdir)
    remove_orphan_figures(expdir)
    if not force and is_finished(expdir, config):
        saved = load_result(expdir)
        return {"name": name, "status": "skipped", "wall_time_s": saved["meta"]["wall_time_s"]}
    # a finished results.json stays until the new one replaces it in one rename: a rerun
    # (--force, another config) that is interrupted or fails leaves the last finished result,
    # which records its own config
    cfg = to_jsonable(config_to_dict(config))
    atomic_write_json(expdir / "config.json", {"experiment": name, "preset": preset, **cfg})
    _seed_everything(config.seed)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.perf_counter()
    with _torch_threads():
        measurements = mod.run(config, expdir)
    wall = time.perf_counter() - t0
    # Round-trip through JSON: figures and claims see exactly what is saved.
    saved_measurements = from_jsonable(json.loads(json.dumps(to_jsonable(measurements))))
    claims = [c.to_dict() for c in mod.claims(saved_measurements)]
    meta = run_metadata(config.device)
    meta.update(
        seed=config.seed,
        preset=preset,
        started_at=started.isoformat(timespec="seconds"),
        wall_time_s=wall,
    )
    record = {
        "experiment": name,
        "title": mod.TITLE,
        "description": mod.DESCRIPTION,
        "config": cfg,
        "measurements": saved_measurements,
        "claims": claims,
        "meta": meta,
    }
    # figures first, under names tied to this record; results.json commits them
    record["figures"] = draw_figures(mod, saved_measurements, expdir, _record_tag(record))
    atomic_write_json(expdir / "results.json", record)
    remove_orphan_figures(expdir)
    if collect_after:
        collect(out)
    return {"name": name, "status": "finished", "wall_time_s": wall}


@contextlib.contextmanager
def _torch_threads() -> Iterator[None]:
    """Run with ``SGDLAB_THREADS`` torch threads (default 1).

    The experiments work on many small tensors, where one thread per process is fastest and
    several processes (``--jobs``) do not oversubscribe the cores.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("SGDLAB_THREADS", "1"))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _die_with_parent(parent: int) -> None:
    """Make this worker process end when ``parent`` does, even on ``kill -9`` of the parent.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a daemon thread polls the parent
    id once a second. A parent that died before either was set up ends the worker at once.
    """
    armed = False
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="sgdlab-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _worker_init(parent: int) -> None:
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    _die_with_parent(parent)


def _worker(name: str, out: str, preset: str, force: bool) -> dict[str, Any]:
    """One experiment of ``reproduce --jobs N``; the parent holds the lock of ``out``."""
    return _run_locked(name, out, preset, None, None, None, force, collect_after=False)


def reproduce(
    out: str | os.PathLike[str],
    preset: str = "quick",
    jobs: int = 1,
    force: bool = False,
    names: Sequence[str] | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run every experiment (or ``names``), collect the claims and build the report.

    With ``jobs > 1`` experiments run in separate processes (spawn context, one torch thread
    each), which end with this process (:func:`_die_with_parent`). Holds the lock of ``out``
    throughout. Returns ``out/results.json`` as a dict plus ``"runs"``, the per-experiment
    summaries.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    todo = list(names) if names is not None else registry.names()
    for n in todo:
        registry.get(n)
    with output_lock(out):
        _remove_stale(Path(out))
        return _reproduce(Path(out), preset, jobs, force, todo, device)


def _reproduce(
    out: Path, preset: str, jobs: int, force: bool, todo: list[str], device: str | None
) -> dict[str, Any]:
    from .report import build_report

    runs: list[dict[str, Any]] = []
    if jobs == 1:
        for n in bar(todo, desc="experiments"):
            runs.append(
                run_experiment(n, out, preset, device=device, force=force, collect_after=False)
            )
    else:
        if device is not None and device != "cpu":
            raise ValueError("--jobs > 1 runs on the CPU; use --jobs 1 with --device cuda")
        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
        ) as pool:
            futures = {pool.submit(_worker, n, str(out), preset, force): n for n in todo}
            for fut in bar(as_completed(futures), desc="experiments", total=len(futures)):
                runs.append(fut.result())
    summary = _collect(out)
    build_report(out)
    summary["runs"] = runs
    return summary

