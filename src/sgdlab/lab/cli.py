"""The ``sgdlab`` command line.

::

    sgdlab list
    sgdlab run NAME [--preset quick|full|tiny] [--set key=value ...] [--out DIR]
                    [--device cpu|cuda] [--seed N] [--force] [--nproc N]
    sgdlab reproduce [--preset quick|full|tiny] [--out DIR] [--jobs N] [--force]
    sgdlab report DIR

``--nproc N`` (N > 1) runs a data-parallel experiment (a module with ``DATA_PARALLEL = True``,
today ``data_parallel``) on N processes: the command re-executes itself under torchrun
(:func:`sgdlab.distributed.run_with_torchrun`, ``--nproc`` removed, ``--set world_size=N``
added) and returns torchrun's exit code. Each rank joins the process group torchrun set up
(:func:`sgdlab.distributed.init_from_env`: NCCL with one GPU per rank under ``--device cuda``,
gloo on CPUs otherwise); rank 0 alone decides whether the experiment is already finished, runs
it and writes every file (``config.json``, ``results.json``, figures, report), the other ranks
take part in the training and write nothing, and all ranks leave together after rank 0 is done.
A rank that raises ends the job (torchrun stops the others; the traceback is recorded). Without
``--nproc`` a data-parallel experiment starts its ranks itself (CPU, gloo). For several nodes
start the ranks with torchrun directly (``docs/distributed.md``)::

    sgdlab run data_parallel --nproc 4
    sgdlab run data_parallel --nproc 8 --device cuda --preset full

One run at a time per ``--out`` directory: ``run``, ``reproduce`` and ``report`` hold a lock on
it (:mod:`sgdlab.lab.lock`); a second one fails at once, naming the process that holds it, and
does not wait. The workers of ``reproduce --jobs N`` end with it, ``kill -9`` included.

Exit codes: 0 success, 2 bad usage (unknown experiment, unknown config key, value of the wrong
type, ``--nproc`` that is not an integer >= 1 or > 1 for an experiment that is not
data-parallel; the message lists what is valid; ``--out`` in use by another run; a file that
cannot be written, ``cannot write PATH: reason``, the file left as it was); under ``--nproc``
torchrun's exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import registry
from .atomic import WriteError
from .config import PRESET_NAMES, ConfigError, describe_fields
from .lock import output_lock

__all__ = ["main"]

DEFAULT_OUT = "sgdlab-results"


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sgdlab",
        description="Measure every claim of the SGD lecture against its closed form.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments and their config keys")
    r = sub.add_parser("run", help="run one experiment")
    r.add_argument("name")
    r.add_argument("--preset", choices=PRESET_NAMES, default="quick")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--out", default=DEFAULT_OUT)
    r.add_argument("--device", choices=("cpu", "cuda"), default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--force", action="store_true", help="redo even if finished")
    r.add_argument("--nproc", default=None, metavar="N",
                   help="processes for a data-parallel experiment (started with torchrun)")
    q = sub.add_parser("reproduce", help="run every experiment and write the report")
    q.add_argument("--preset", choices=PRESET_NAMES, default="quick")
    q.add_argument("--out", default=DEFAULT_OUT)
    q.add_argument("--jobs", type=int, default=1)
    q.add_argument("--device", choices=("cpu", "cuda"), default=None)
    q.add_argument("--force", action="store_true", help="redo finished experiments")
    rep = sub.add_parser("report", help="rebuild DIR/index.html from saved results")
    rep.add_argument("dir")
    return p


def _cmd_list(verbose: bool = True) -> int:
    for name in registry.names():
        mod = registry.get(name)
        accepts = "  [data-parallel: --nproc N]" if getattr(mod, "DATA_PARALLEL", False) else ""
        print(f"{name:18s} {mod.TITLE}{accepts}")
        if verbose:
            print(describe_fields(mod.Config))
    return 0


def _check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but torch.cuda.is_available() is False")


def _parse_nproc(text: str | None) -> int:
    if text is None:
        return 1
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--nproc must be an integer >= 1, got {text!r}")
    return n


def _launch(argv: list[str], args: argparse.Namespace, sets: dict[str, str], nproc: int) -> int:
    """``sgdlab run NAME --nproc N``: validate here, then re-execute under torchrun."""
    from ..distributed import run_with_torchrun
    from .runner import make_config

    mod = registry.get(args.name)
    if not getattr(mod, "DATA_PARALLEL", False):
        raise ConfigError(
            f"--nproc {nproc}: experiment {args.name!r} runs in one process; --nproc > 1 is "
            f"accepted by the data-parallel experiments: {', '.join(registry.data_parallel())}"
        )
    if "world_size" in sets and sets["world_size"].strip() != str(nproc):
        raise ConfigError(
            f"--nproc {nproc} contradicts --set world_size={sets['world_size']}; give one of "
            "them (--nproc sets world_size)"
        )
    make_config(args.name, args.preset, {**sets, "world_size": str(nproc)}, args.seed,
                args.device)  # validate before starting any process
    return run_with_torchrun([*argv, "--set", f"world_size={nproc}"], nproc)


def _run_rank(args: argparse.Namespace, sets: dict[str, str]) -> int:
    """One rank of ``sgdlab run NAME`` under torchrun (see the module docstring)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run_rank_inner)(args, sets)


def _run_rank_inner(args: argparse.Namespace, sets: dict[str, str]) -> int:
    import torch.distributed as dist

    from ..distributed import init_from_env
    from .report import build_report
    from .runner import is_finished, make_config, run_experiment

    mod = registry.get(args.name)
    if not getattr(mod, "DATA_PARALLEL", False):
        raise ConfigError(
            f"experiment {args.name!r} is not data-parallel and cannot run under torchrun; "
            f"data-parallel experiments: {', '.join(registry.data_parallel())}"
        )
    config = make_config(args.name, args.preset, sets, args.seed, args.device)
    init_from_env("nccl" if config.device.startswith("cuda") else "gloo",
                  timeout=config.timeout)
    try:
        if dist.get_rank() == 0:
            with output_lock(args.out):
                todo = [args.force or not is_finished(Path(args.out) / args.name, config)]
                dist.broadcast_object_list(todo, src=0)
                res = run_experiment(args.name, args.out, args.preset, sets, args.seed,
                                     args.device, force=bool(todo[0]))
                build_report(args.out)
            print(
                f"{res['name']}: {res['status']} ({res['wall_time_s']:.1f} s, "
                f"{dist.get_world_size()} ranks); results in {Path(args.out) / args.name}; "
                f"report {Path(args.out) / 'index.html'}"
            )
        else:
            todo = [None]
            dist.broadcast_object_list(todo, src=0)
            if todo[0]:
                mod.run_worker(config)
        dist.barrier()  # the other ranks leave once rank 0 has written everything
    finally:
        dist.destroy_process_group()
    return 0


def _check_out(out: str) -> None:
    """``--out``: a directory that exists or can be made (not empty: ``""`` would write into
    the working directory)."""
    if not out.strip():
        raise ConfigError("--out must name a directory, got an empty string")
    path = Path(out)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {out!r}: {str(parent)!r} exists and is not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out!r}: cannot make the directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out!r} is not writable")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sgdlab`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from .report import build_report
    from .runner import make_config, reproduce, run_experiment

    try:
        if getattr(args, "out", None) is not None and args.command != "run":
            _check_out(args.out)
        if args.command == "list":
            return _cmd_list()
        if args.command == "run":
            from ..distributed import launched_by_torchrun

            nproc = _parse_nproc(args.nproc)
            _check_device(args.device)
            sets = _parse_sets(args.sets)
            if nproc == 1 and not launched_by_torchrun():
                make_config(args.name, args.preset, sets, args.seed, args.device)  # validate
            _check_out(args.out)  # made only for a valid run
            if launched_by_torchrun():
                return _run_rank(args, sets)
            if nproc > 1:
                return _launch(argv, args, sets, nproc)
            with output_lock(args.out):
                res = run_experiment(
                    args.name, args.out, args.preset, sets, args.seed, args.device, args.force
                )
                build_report(args.out)
            print(
                f"{res['name']}: {res['status']} ({res['wall_time_s']:.1f} s); "
                f"results in {Path(args.out) / args.name}; report {Path(args.out) / 'index.html'}"
            )
            return 0
        if args.command == "reproduce":
            if args.jobs < 1:
                raise ConfigError(f"--jobs must be an integer >= 1, got {args.jobs}")
            _check_device(args.device)
            summary = reproduce(args.out, args.preset, args.jobs, args.force, device=args.device)
            verdicts: dict[str, int] = {}
            for c in summary["claims"]:
                verdicts[c["verdict"]] = verdicts.get(c["verdict"], 0) + 1
            print(
                "claims: "
                + ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items()))
                + f"\nreport: {(Path(args.out) / 'index.html').resolve()}"
            )
            return 0
        if args.command == "report":
            d = Path(args.dir)
            if not (d.is_dir() and any((d / n / "results.json").is_file()
                                      for n in registry.names())):
                raise ConfigError(f"{args.dir!r} holds no finished experiment results")
            print(f"report: {build_report(d).resolve()}")
            return 0
    except KeyboardInterrupt:
        print("sgdlab: interrupted; finished experiments and their results are kept",
              file=sys.stderr)
        return 130
    except (ConfigError, registry.UnknownExperimentError, WriteError) as exc:
        print(f"sgdlab: error: {exc}", file=sys.stderr)
        if isinstance(exc, registry.UnknownExperimentError):
            print("run `sgdlab list` for the experiments and their keys", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
