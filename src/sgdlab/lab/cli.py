"""The ``sgdlab`` command line.

::

    sgdlab list
    sgdlab run NAME [--preset quick|full|tiny] [--set key=value ...] [--out DIR]
                    [--device cpu|cuda] [--seed N] [--force] [--nproc N]
    sgdlab reproduce [--preset quick|full|tiny] [--out DIR] [--jobs N] [--force]
    sgdlab report DIR [--tensorboard [--logdir LOGDIR]]
    sgdlab --version

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

Progress goes to stderr: on a terminal one bar naming the running experiment, otherwise one
line per experiment started and finished (:mod:`sgdlab.lab.progress`). A rerun skips finished
experiments with the same configuration (saying so) and refuses to replace the results of
another configuration unless ``--force``.

Exit codes: 0 success, 2 bad usage (unknown experiment, unknown config key, value of the wrong
type or out of its range, a device this machine does not have (``--device`` or ``--set
device=``), ``--nproc`` that is not an integer >= 1 or > 1 for an experiment that is not
data-parallel; the message lists what is valid; ``--out`` in use by another run; finished
results of another configuration without ``--force``; a file that cannot be written, ``cannot
write PATH: reason``, the file left as it was; ``--tensorboard`` without tensorboard
installed); 130 interrupted (Ctrl-C: the running experiments stop, queued ones never start,
finished results are kept and the message says how to resume); 141 stdout closed by its reader
(``sgdlab list | head``), quietly; under ``--nproc`` torchrun's exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import registry
from .atomic import WriteError
from .config import PRESET_NAMES, ConfigError, check_device, describe_fields
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


_OUT_HELP = f"results directory (default: ./{DEFAULT_OUT})"
_EPILOG = (
    "Exit codes: 0 success; 2 bad usage (the message says what is valid); 130 interrupted "
    "(Ctrl-C: finished results are kept, rerun the same command to resume); 141 output pipe "
    "closed. SGDLAB_PROGRESS=0 silences progress, 1 forces the bar."
)


def _parser() -> argparse.ArgumentParser:
    import sgdlab

    p = argparse.ArgumentParser(
        prog="sgdlab",
        description="Measure every claim of the SGD lecture against its closed form.",
        epilog=_EPILOG,
    )
    p.add_argument("--version", action="version", version=f"sgdlab {sgdlab.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "list",
        help="list the experiments and their config keys",
        description="List the experiments, their config keys, types, allowed "
        "ranges and quick-preset defaults.",
        epilog=_EPILOG,
    )
    r = sub.add_parser(
        "run",
        help="run one experiment",
        epilog=_EPILOG,
        description="Run one experiment into DIR/NAME (config.json, "
        "results.json, figures, curves/*.csv) and rebuild DIR/index.html. A "
        "finished run with the same configuration is skipped.",
    )
    r.add_argument("name", help="experiment name (see `sgdlab list`)")
    _common(r, "preset: tiny (tests, seconds), quick (minutes), full (the report's figures)")
    r.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, repeatable; keys, types and ranges: `sgdlab list`",
    )
    r.add_argument("--seed", type=int, default=None, help="random seed (default: the config's, 0)")
    r.add_argument(
        "--nproc",
        default=None,
        metavar="N",
        help="processes for a data-parallel experiment, started with torchrun "
        "(default: 1, ranks started in-process)",
    )
    q = sub.add_parser(
        "reproduce",
        help="run every experiment and write the report",
        epilog=_EPILOG,
        description="Run every experiment into DIR, collect their claims in "
        "DIR/results.json and write the report DIR/index.html. Finished "
        "experiments are skipped, so an interrupted run resumes.",
    )
    _common(q, "preset of every experiment: tiny, quick or full")
    q.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="experiments run at once, each in its own process, CPU only (default: 1)",
    )
    rep = sub.add_parser(
        "report",
        help="rebuild DIR/index.html from saved results",
        epilog=_EPILOG,
        description="Rebuild DIR/index.html and DIR/<experiment>/curves/*.csv "
        "from the saved results.json files (nothing is rerun).",
    )
    rep.add_argument("dir", metavar="DIR", help="a results directory of `run` or `reproduce`")
    rep.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write every saved curve as TensorBoard scalars (needs "
        "`pip install tensorboard`)",
    )
    rep.add_argument(
        "--logdir",
        default=None,
        metavar="LOGDIR",
        help="where --tensorboard writes (default: DIR/tensorboard)",
    )
    return p


def _common(sub: argparse.ArgumentParser, preset_help: str) -> None:
    """The options ``run`` and ``reproduce`` share."""
    sub.add_argument(
        "--preset", choices=PRESET_NAMES, default="quick", help=f"{preset_help} (default: quick)"
    )
    sub.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=_OUT_HELP)
    sub.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="torch device for model training (default: the config's, cpu); cuda must be available",
    )
    sub.add_argument(
        "--force",
        action="store_true",
        help="rerun finished experiments, replacing results of another configuration",
    )


def _cmd_list(verbose: bool = True) -> int:
    for name in registry.names():
        mod = registry.get(name)
        accepts = "  [data-parallel: --nproc N]" if getattr(mod, "DATA_PARALLEL", False) else ""
        print(f"{name:18s} {mod.TITLE}{accepts}")
        if verbose:
            print(describe_fields(mod.Config))
    return 0


def _check_device(device: str | None) -> None:
    if device is not None:
        check_device(device)


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
    make_config(
        args.name, args.preset, {**sets, "world_size": str(nproc)}, args.seed, args.device
    )  # validate before starting any process
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
    init_from_env("nccl" if config.device.startswith("cuda") else "gloo", timeout=config.timeout)
    try:
        if dist.get_rank() == 0:
            with output_lock(args.out):
                todo = [args.force or not is_finished(Path(args.out) / args.name, config)]
                dist.broadcast_object_list(todo, src=0)
                res = run_experiment(
                    args.name,
                    args.out,
                    args.preset,
                    sets,
                    args.seed,
                    args.device,
                    force=bool(todo[0]),
                )
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
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _broken_pipe()


def _broken_pipe() -> int:
    """The reader of stdout left (``sgdlab list | head``): stop quietly with 128 + SIGPIPE,
    as a program killed by the signal would; stdout goes to /dev/null so that Python's flush
    at exit does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from .report import build_report
    from .runner import Interrupted, make_config, reproduce

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
            return _cmd_run(args, sets)
        if args.command == "reproduce":
            if args.jobs < 1:
                raise ConfigError(f"--jobs must be an integer >= 1, got {args.jobs}")
            _check_device(args.device)
            try:
                summary = reproduce(
                    args.out, args.preset, args.jobs, args.force, device=args.device
                )
            except Interrupted as exc:
                print(
                    f"sgdlab: interrupted; {exc}, their results kept in {args.out} "
                    f"(report {Path(args.out) / 'index.html'}); resume with: sgdlab "
                    f"reproduce --preset {args.preset} --out {args.out}",
                    file=sys.stderr,
                )
                return 130
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
            return _cmd_report(args, build_report)
    except KeyboardInterrupt:
        print(
            "sgdlab: interrupted; finished experiments and their results are kept", file=sys.stderr
        )
        return 130
    except (ConfigError, registry.UnknownExperimentError, WriteError) as exc:
        print(f"sgdlab: error: {exc}", file=sys.stderr)
        if isinstance(exc, registry.UnknownExperimentError):
            print("run `sgdlab list` for the experiments and their keys", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse requires a command


def _cmd_run(args: argparse.Namespace, sets: dict[str, str]) -> int:
    """``sgdlab run NAME`` in this process, with its progress."""
    from .progress import Progress
    from .report import build_report
    from .runner import expected_costs, make_config, refuse_conflict, run_experiment

    with output_lock(args.out):
        if not args.force:  # before the progress says it started
            config = make_config(args.name, args.preset, sets, args.seed, args.device)
            refuse_conflict(Path(args.out) / args.name, config)
        progress = Progress([args.name], expected_costs(Path(args.out), [args.name], args.preset))
        progress.started(args.name)
        try:
            res = run_experiment(
                args.name, args.out, args.preset, sets, args.seed, args.device, args.force
            )
            progress.finished(args.name, res)
        finally:
            progress.close()
        build_report(args.out)
    where = Path(args.out) / args.name
    if res["status"] == "skipped":
        print(f"{res['name']}: skipped: {res['reason']}; report {Path(args.out) / 'index.html'}")
    else:
        print(
            f"{res['name']}: {res['status']} ({res['wall_time_s']:.1f} s); results in {where}; "
            f"report {Path(args.out) / 'index.html'}"
        )
    return 0


def _cmd_report(args: argparse.Namespace, build_report: Any) -> int:
    """``sgdlab report DIR [--tensorboard [LOGDIR]]``."""
    d = Path(args.dir)
    if not (d.is_dir() and any((d / n / "results.json").is_file() for n in registry.names())):
        raise ConfigError(f"{args.dir!r} holds no finished experiment results")
    if args.tensorboard:
        from .results import require_tensorboard

        require_tensorboard()  # before anything is written
    print(f"report: {build_report(d).resolve()}")
    if args.tensorboard:
        from .results import write_tensorboard

        logdir = Path(args.logdir) if args.logdir else d / "tensorboard"
        n = write_tensorboard(d, logdir)
        print(f"tensorboard: {n} curves in {logdir.resolve()} (tensorboard --logdir {logdir})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
