"""A/B benchmark of the augmented backward: this tree against an earlier commit, same process.

Timings of these small models move by 15-20% between machine starts, so a change is judged
against the previous code in the same run: the earlier commit's ``src/sgdlab`` is extracted
with ``git archive`` into a temporary directory as the package ``sgdlab_old`` (imports
rewritten), and each round times one step of every variant in a rotating order:

* ``plain``    ordinary backward;
* ``old``      ``sgdlab_old.stats.track`` (the earlier commit);
* ``new``      ``sgdlab.stats.track`` (this tree);
* ``new, torch ops``  this tree with the fused Linear kernel off (``sgdlab.stats._fused_linear``;
  the same as ``new`` where Triton or CUDA is missing).

Reported per model: median step time, median over rounds of time / plain's time, and the
largest relative difference of the second moments from ``old``'s. On CUDA it also times the
flush of the benchmark MLP's three Linear calls alone (fused kernel vs torch operations).

Run from the repository root::

    PYTHONPATH=src python benchmarks/augmented_backward_ab.py --old e98ca60 --rounds 300
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import augmented_backward as ab  # noqa: E402

import sgdlab.stats as new  # noqa: E402
from sgdlab.stats import _fused_linear  # noqa: E402
from sgdlab.stats.linear import linear_moments  # noqa: E402


def extract_old(rev: str, into: str) -> None:
    """``src/sgdlab`` at ``rev`` as the package ``sgdlab_old`` under ``into``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "archive", rev, "src/sgdlab"], cwd=root, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    pkg = Path(into) / "sgdlab_old"
    (Path(into) / "src" / "sgdlab").rename(pkg)
    for f in pkg.rglob("*.py"):
        text = f.read_text()
        text = re.sub(r"\b(from|import) sgdlab\b", r"\1 sgdlab_old", text)
        f.write_text(text)


def step(model, x, y, fused_off: bool) -> None:
    saved = _fused_linear._kernel
    if fused_off:
        _fused_linear._kernel = False
    try:
        model.zero_grad(set_to_none=True)
        ab.ce(model(x), y).backward()
    finally:
        _fused_linear._kernel = saved


def flush_timing(dev: torch.device) -> None:
    """Host time of linear_moments on the benchmark MLP's three calls, fused and torch."""
    calls = [(True, True, torch.float32, torch.randn(256, i, device=dev),
              torch.randn(256, o, device=dev)) for i, o in [(784, 512), (512, 512), (512, 10)]]
    for tag, off in (("fused kernel", False), ("torch operations", True)):
        saved = _fused_linear._kernel
        if off:
            _fused_linear._kernel = False
        for _ in range(50):
            linear_moments(calls, 256.0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            linear_moments(calls, 256.0)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        _fused_linear._kernel = saved
        print(f"MLP lane flush, {tag}: {(t1 - t0) / 500 * 1e6:.1f} us of host time per call")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="HEAD~1", help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp(prefix="sgdlab_old_")
    extract_old(args.old, tmp)
    sys.path.insert(0, tmp)
    import sgdlab_old.stats as old

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}; "
          f"torch {torch.__version__}; old = {args.old}")
    if dev.type == "cuda":
        flush_timing(dev)
    for name, make, data in ab.problems(args.quick):
        torch.manual_seed(0)
        x, y = (t.to(dev) for t in data())
        base = make().to(dev)
        variants = {}
        for v in ("plain", "old", "new", "new, torch ops"):
            m = make().to(dev)
            m.load_state_dict(base.state_dict())
            if v == "old":
                old.track(m)
            elif v != "plain":
                new.track(m)
            variants[v] = (m, v == "new, torch ops")
        ref = None
        diffs = {}
        for v, (m, off) in variants.items():
            if v == "plain":
                continue
            step(m, x, y, off)
            ms = [p.grad_second_moment.double() for p in m.parameters()]
            if ref is None:
                ref = ms
            else:
                diffs[v] = max(float((u - w).abs().max() / w.abs().max())
                               for u, w in zip(ms, ref, strict=True))
        names = list(variants)
        for _ in range(20):
            for n in names:
                step(variants[n][0], x, y, variants[n][1])
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                ab.sync(dev)
                t0 = time.perf_counter()
                step(variants[n][0], x, y, variants[n][1])
                ab.sync(dev)
                times[n].append(time.perf_counter() - t0)
        base_t = times["plain"]
        print(f"| {name} | median step (ms) | ratio to plain | max rel. diff vs old |")
        print("|---|---:|---:|---:|")
        for n in names:
            ratio = statistics.median(t / b for t, b in zip(times[n], base_t, strict=True))
            d = f"{diffs[n]:.1e}" if n in diffs else ""
            print(f"| {n} | {statistics.median(times[n]) * 1e3:.3f} | {ratio:.2f} | {d} |")


if __name__ == "__main__":
    main()
