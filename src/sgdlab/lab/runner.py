"""Run experiments into a results directory, resumably, and collect their claims.

Layout of a results directory ``DIR``::

    DIR/<experiment>/config.json     the typed config of the run
    DIR/<experiment>/results.json    measurements, claims, figures, metadata (written last)
    DIR/<experiment>/STEM.TAG.png    figures, drawn from the saved measurements
    DIR/<experiment>/curves/NAME.csv the data of each figure (the record's ``curves``)
    DIR/results.json                 every claim of every finished experiment + errata
    DIR/index.html                   the report

An experiment is *finished* when its ``results.json`` exists and records the same config as the
one requested (a damaged one, :func:`load_result`, is not finished: it is run again, and skipped
with its reason by :func:`collect` and the report, never fatal to the others);
:func:`run_experiment` skips finished experiments unless ``force``, and refuses to replace the
finished results of another configuration unless ``force`` (:class:`ResultsConflictError`,
raised before anything is written). Every file is written
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
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from . import registry
from .atomic import (
    WriteError,
    atomic_write_json,
    from_jsonable,
    remove_stale_temporaries,
    to_jsonable,
)
from .config import ConfigError, build_config, check_device, config_to_dict
from .lock import output_lock
from .progress import Progress
from .results import (
    FIGURE_NAME,
    DamagedResultError,
    _collect,
    _record_tag,
    collect,
    draw_figures,
    is_finished,
    load_result,
    remove_orphan_figures,
    run_metadata,
    write_curves,
)

__all__ = [
    "FIGURE_NAME",
    "DamagedResultError",
    "Interrupted",
    "ResultsConflictError",
    "collect",
    "config_conflict",
    "draw_figures",
    "is_finished",
    "load_result",
    "make_config",
    "refuse_conflict",
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
    """The typed config of experiment ``name`` (preset, then ``--set`` overrides, seed, device).

    The device, from ``device`` or ``overrides``, must be available here
    (:func:`~sgdlab.lab.config.check_device`).
    """
    mod = registry.get(name)
    merged = dict(overrides or {})
    if seed is not None:
        merged["seed"] = seed
    if device is not None:
        merged["device"] = device
    config = build_config(mod.Config, mod.PRESETS, preset, merged)
    check_device(config.device)
    return config


class ResultsConflictError(ConfigError):
    """``DIR/<experiment>`` holds finished results of another configuration; replacing them
    takes ``force``. Raised before anything is written."""


def config_conflict(expdir: str | os.PathLike[str], config: Any) -> str | None:
    """The keys in which the finished results in ``expdir`` differ from ``config``
    (``"key: saved -> requested"``), or None when there are none, or no usable results."""
    if not (Path(expdir) / "results.json").is_file():
        return None
    try:
        saved = load_result(expdir)["config"]
    except DamagedResultError:
        return None  # run again: the new result replaces the damaged one
    wanted = to_jsonable(config_to_dict(config))
    keys = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if not keys:
        return None
    return ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in keys[:3]) + (
        f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    )


def refuse_conflict(expdir: Path, config: Any) -> None:
    """Raise :class:`ResultsConflictError` if ``expdir`` holds finished results of another
    configuration than ``config`` (:func:`config_conflict`)."""
    diff = config_conflict(expdir, config)
    if diff is not None:
        raise ResultsConflictError(
            f"{expdir} holds finished results of another configuration ({diff}); "
            "use --force to replace them"
        )


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
    """Run one experiment into ``out/<name>`` unless finished; return a short summary
    (``name``, ``status`` "finished" or "skipped", ``wall_time_s``, and for a skip ``reason``).

    Holds the lock of ``out`` (:mod:`sgdlab.lab.lock`) and first removes the temporaries that
    killed runs left in ``out``; an invalid config, or finished results of another config
    without ``force`` (:class:`ResultsConflictError`), fail before anything is written.
    """
    config = make_config(name, preset, overrides, seed, device)
    with output_lock(out):
        if not force:
            refuse_conflict(Path(out) / name, config)
        _remove_stale(Path(out))
        return _run_locked(name, out, preset, overrides, seed, device, force, collect_after)


def skip_reason(expdir: Path) -> str:
    """Why a finished experiment is not run again."""
    return f"finished results with the same configuration in {expdir} (use --force to rerun)"


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
        return {
            "name": name,
            "status": "skipped",
            "wall_time_s": saved["meta"]["wall_time_s"],
            "reason": skip_reason(expdir),
        }
    # a finished results.json stays until the new one replaces it in one rename: a rerun
    # (--force) that is interrupted or fails leaves the last finished result, which records
    # its own config
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
    extras = _record_extras(mod, saved_measurements)  # lifted out of the measurements
    record = {
        "experiment": name,
        "title": mod.TITLE,
        "description": mod.DESCRIPTION,
        "config": cfg,
        "measurements": saved_measurements,
        "claims": claims,
        "meta": meta,
        **extras,
    }
    # figures first, under names tied to this record; results.json commits them
    record["figures"] = draw_figures(mod, saved_measurements, expdir, _record_tag(record))
    atomic_write_json(expdir / "results.json", record)
    remove_orphan_figures(expdir)
    write_curves(expdir, record)
    if collect_after:
        collect(out)
    return {"name": name, "status": "finished", "wall_time_s": wall}


def _record_extras(mod: Any, measurements: Any) -> dict[str, Any]:
    """The record's optional top-level ``curves`` (each figure's data) and ``dropped`` (points
    left out, with why): from the experiment's ``curves(measurements)`` /
    ``dropped(measurements)`` when it defines them, else taken out of its measurements' keys
    (stored once, at the top level)."""
    extras: dict[str, Any] = {}
    for key in ("curves", "dropped"):
        fn = getattr(mod, key, None)
        if callable(fn):
            value = fn(measurements)
        elif isinstance(measurements, dict):
            value = measurements.pop(key, None)
        else:
            value = None
        if value is not None:
            extras[key] = to_jsonable(value)
    return extras


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


_IN_EXPERIMENT = threading.Event()  # set while a worker runs an experiment


def _stop_worker(signum: int, frame: Any) -> None:
    """SIGTERM in a worker: unwind the running experiment (its own processes end, its
    temporaries go; :func:`_worker` then exits quietly), or exit at once when idle."""
    if _IN_EXPERIMENT.is_set():
        raise KeyboardInterrupt
    os._exit(130)


def _worker_init(parent: int) -> None:
    """A ``reproduce --jobs N`` worker: no bars of its own, Ctrl-C (SIGINT to the terminal's
    process group) left to the parent, which stops the worker with SIGTERM."""
    os.environ.setdefault("SGDLAB_PROGRESS", "0")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)
    _die_with_parent(parent)


def _worker(name: str, out: str, preset: str, force: bool) -> dict[str, Any]:
    """One experiment of ``reproduce --jobs N``; the parent holds the lock of ``out``."""
    _IN_EXPERIMENT.set()
    try:
        return _run_locked(name, out, preset, None, None, None, force, collect_after=False)
    except KeyboardInterrupt:
        os._exit(130)  # stopped by the parent (:func:`_stop_pool`), which reports it
    finally:
        _IN_EXPERIMENT.clear()


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`reproduce`: the running experiments were stopped, the queued ones
    not started; ``finished`` names the experiments whose results are in the directory."""

    def __init__(self, finished: list[str], total: int) -> None:
        super().__init__(f"{len(finished)} of {total} experiments finished")
        self.finished = finished
        self.total = total


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
    each), at most ``jobs`` at a time, which end with this process (:func:`_die_with_parent`).
    Holds the lock of ``out`` throughout. Finished results of another configuration are
    refused before anything runs unless ``force`` (:class:`ResultsConflictError`). Ctrl-C
    stops the running experiments at once, starts no other, rebuilds the report of the
    finished ones and raises :class:`Interrupted`. Returns ``out/results.json`` as a dict plus
    ``"runs"``, the per-experiment summaries.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    todo = list(names) if names is not None else registry.names()
    if jobs > 1 and device is not None and device != "cpu":
        raise ConfigError("--jobs > 1 runs on the CPU; use --jobs 1 with --device cuda")
    configs = {n: make_config(n, preset, device=device) for n in todo}
    with output_lock(out):
        if not force:
            clashes = [n for n in todo if config_conflict(Path(out) / n, configs[n])]
            if clashes:
                raise ResultsConflictError(
                    f"{out} holds finished results of another configuration for "
                    f"{', '.join(clashes)} (another preset or --set); use --force to replace "
                    "them, or another --out"
                )
        _remove_stale(Path(out))
        return _reproduce(Path(out), preset, jobs, force, todo, device)


def _reproduce(
    out: Path, preset: str, jobs: int, force: bool, todo: list[str], device: str | None
) -> dict[str, Any]:
    from .report import build_report  # the report reads results; the runner only calls it

    runs: list[dict[str, Any]] = []
    progress = Progress(todo, expected_costs(out, todo, preset))
    try:
        if jobs == 1:
            for n in todo:
                progress.started(n)
                runs.append(
                    run_experiment(n, out, preset, device=device, force=force, collect_after=False)
                )
                progress.finished(n, runs[-1])
        else:
            _run_pool(out, preset, jobs, force, todo, runs, progress)
    except KeyboardInterrupt:
        progress.close()
        finished = [n for n in todo if (out / n / "results.json").is_file()]
        with contextlib.suppress(Exception):
            build_report(out)  # the report of what is finished
        raise Interrupted(finished, len(todo)) from None
    progress.close()
    summary = _collect(out)
    build_report(out)
    summary["runs"] = runs
    return summary


def _run_pool(
    out: Path,
    preset: str,
    jobs: int,
    force: bool,
    todo: list[str],
    runs: list[dict[str, Any]],
    progress: Progress,
) -> None:
    """``reproduce --jobs N``: at most N experiments submitted at a time (none queued in the
    pool, so an interrupt has nothing left to run); Ctrl-C stops the workers."""
    ctx = get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),)
    )
    queue = list(todo)
    running: dict[Any, str] = {}
    try:
        while queue or running:
            while queue and len(running) < jobs:
                n = queue.pop(0)
                running[pool.submit(_worker, n, str(out), preset, force)] = n
                progress.started(n)
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                n = running.pop(fut)
                runs.append(fut.result())
                progress.finished(n, runs[-1])
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor, grace_s: float = 5.0) -> None:
    """End every worker of ``pool`` now: SIGTERM (the experiment unwinds), SIGKILL after
    ``grace_s``; nothing queued runs."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(OSError, ValueError):
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def expected_costs(out: Path, todo: Sequence[str], preset: str) -> dict[str, float]:
    """Each experiment's expected wall time in seconds: its last run at this preset in ``out``
    when there is one, else the registry's record (:data:`~sgdlab.lab.registry.COST_S`)."""
    costs = {}
    for n in todo:
        cost = registry.cost(n, preset)
        try:
            rec = load_result(out / n)
            if rec["meta"].get("preset") == preset:
                cost = float(rec["meta"]["wall_time_s"])
        except DamagedResultError:
            pass
        costs[n] = max(cost, 0.1)
    return costs
