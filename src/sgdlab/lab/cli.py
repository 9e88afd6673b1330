"""The ``sgdlab`` command line.

::

    sgdlab list
    sgdlab run NAME [--preset quick|full|tiny] [--set key=value ...] [--out DIR]
                    [--device cpu|cuda] [--seed N] [--force]
    sgdlab reproduce [--preset quick|full|tiny] [--out DIR] [--jobs N] [--force]
    sgdlab report DIR

Exit codes: 0 success, 2 bad usage (unknown experiment, unknown config key, value of the wrong
type; the message lists what is valid).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import registry
from .config import PRESET_NAMES, ConfigError, describe_fields

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
        print(f"{name:18s} {mod.TITLE}")
        if verbose:
            print(describe_fields(mod.Config))
    return 0


def _check_device(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but torch.cuda.is_available() is False")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sgdlab`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    from .report import build_report
    from .runner import make_config, reproduce, run_experiment

    try:
        if args.command == "list":
            return _cmd_list()
        if args.command == "run":
            _check_device(args.device)
            sets = _parse_sets(args.sets)
            make_config(args.name, args.preset, sets, args.seed, args.device)  # validate first
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
    except (ConfigError, registry.UnknownExperimentError) as exc:
        print(f"sgdlab: error: {exc}", file=sys.stderr)
        if isinstance(exc, registry.UnknownExperimentError):
            print("run `sgdlab list` for the experiments and their keys", file=sys.stderr)
        return 2
    return 2  # pragma: no cover - argparse requires a command


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
