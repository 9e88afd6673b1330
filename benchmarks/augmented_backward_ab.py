"""A/B benchmark of the augmented backward: this tree against an earlier commit, same process.

Timings of these small models move by 15-20% between machine starts, so a change is judged
against the previous code in the same run: the earlier commit's ``src/sgdlab`` is extracted
with ``git archive`` into a temporary directory as the package ``sgdlab_old`` (imports
rewritten), and each round times one step of every variant in a rotating order:

* ``plain``    ordinary backward;
* ``old``      ``sgdlab_old.stats.track`` (the earlier commit);
* ``new``      ``sgdlab.stats.track`` (this tree);
* ``new, torch ops``  this tree with the fused Linear kernel off (``sgdlab.stats._fused_linear``;
  the same as ``new`` where Triton or CUDA is missing);
* ``floor``    a bare hook probe (:class:`Floor`, models of ``nn.Linear``, convolutions and
  per-example norms only): the same forward hooks, backward pre-hooks and kernels as ``new``
  (``linear_moments``, ``linear_seq_moments``, ``conv_moments``, ``norm_moments``) but none of
  its checks and bookkeeping, so ``new - floor`` is what the tracker's checks cost and
  ``floor - plain`` what any hook-based tracker with these kernels pays.

``--tiny`` runs small models instead (a 3-layer and a 33-layer MLP of width 16, 12 Linear
layers applied at 4 positions, 6 LayerNorm + Linear pairs likewise, two torch
``TransformerEncoderLayer`` of width 16, a 2-conv CNN; batch 8),
where the step is all host work: a proxy, on a CPU, for a GPU step bound by launches.

``--decoder`` runs a transposed-convolution decoder (``ConvTranspose2d`` 64 -> 32 -> 3 from 8x8
to 32x32 and a linear head, batch 64) and a hand-written recurrent loop (``LSTMCell`` stepped 16
times), whose layers took the ``torch.func`` fallback before ``sgdlab.stats.conv_transpose`` and
``sgdlab.stats.cell``.

Reported per model: median step time, median over rounds of time / plain's time, and the
largest relative difference of the second moments from ``old``'s. On CUDA it also times the
flush of the benchmark MLP's three Linear calls alone (fused kernel vs torch operations).

Run from the repository root::

    PYTHONPATH=src python benchmarks/augmented_backward_ab.py --old e98ca60 --rounds 300
    PYTHONPATH=src python benchmarks/augmented_backward_ab.py --old HEAD --tiny --cpu
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import augmented_backward as ab  # noqa: E402

import sgdlab.stats as new  # noqa: E402
from sgdlab.stats import _fused_linear  # noqa: E402
from sgdlab.stats.conv import conv_moments  # noqa: E402
from sgdlab.stats.linear import linear_moments, linear_seq_moments  # noqa: E402
from sgdlab.stats.norm import norm_moments  # noqa: E402

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)


class Floor:
    """A bare hook-based tracker for models whose parameters are all in ``nn.Linear``,
    convolutions and per-example norms: a forward hook per module registers a pre-hook on the
    output's node, the pre-hook keeps ``(module, input, output gradient)``, and at the end of
    the backward pass the stashed calls go through the library's kernels (``linear_moments``
    for all 2-D Linear calls at once, ``linear_seq_moments`` per Linear call on
    ``[B, T..., in]``, ``conv_moments`` per convolution, ``norm_moments`` per norm) and the
    results are set as ``grad_second_moment``. No input, batch, sharing or coverage checks, no
    accumulation over passes, no chunks (each call in one piece, which a CPU runs slower than
    the tracker's cache-sized chunks for large convolutions): a probe of host cost, not a
    tracker to use."""

    def __init__(self, model: nn.Module) -> None:
        self.stash: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self.queued = False
        for m in model.modules():
            if isinstance(m, (nn.Linear, *_CONV, *_NORM)):
                m.register_forward_hook(self.hook)
            elif any(True for _ in m.parameters(recurse=False)):
                raise ValueError(f"Floor handles Linear, convolutions and norms only, got {m}")

    def hook(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.grad_fn.register_prehook(functools.partial(self.pre, module, args[0], out.output_nr))

    def pre(self, module: nn.Module, x: torch.Tensor, nr: int, grads: tuple) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        self.stash.append((module, x, grads[nr]))

    def finish(self) -> None:
        items, self.stash, self.queued = self.stash, [], False
        B = float(items[0][1].shape[0])
        with torch.no_grad():
            lane = [(m, x, d) for m, x, d in items if isinstance(m, nn.Linear) and x.dim() == 2]
            calls = [(True, m.bias is not None, m.weight.dtype, x, d) for m, x, d in lane]
            done = list(zip([m for m, _, _ in lane], linear_moments(calls, B) if calls else []))
            for m, x, d in items:
                if not isinstance(m, nn.Linear) or x.dim() != 2:
                    f = (
                        linear_seq_moments
                        if isinstance(m, nn.Linear)
                        else norm_moments
                        if isinstance(m, _NORM)
                        else conv_moments
                    )
                    done.append((m, f(m, x, d, B, 1 << 40, True, m.bias is not None)))
            for m, res in done:
                for p, r in zip((m.weight, m.bias), res, strict=False):
                    p.grad_second_moment = r


def decoder_problems() -> list[tuple[str, object, object]]:
    """A DCGAN-like upsampling decoder (transposed convolutions), batch 64."""

    def decoder() -> nn.Module:
        return nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 4, 2, 1),
            nn.Flatten(),
            nn.Linear(3 * 32 * 32, 10),
        )

    def data():
        return torch.randn(64, 64, 8, 8), torch.randint(0, 10, (64,))

    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = nn.LSTMCell(128, 256)
            self.head = nn.Linear(256, 10)

        def forward(self, x):
            state = None
            for t in range(x.shape[1]):
                state = self.cell(x[:, t], state)
            return self.head(state[0])

    def seq():
        return torch.randn(64, 16, 128), torch.randint(0, 10, (64,))

    return [
        ("decoder, 2 ConvTranspose2d + 1 linear, B=64", decoder, data),
        ("LSTMCell(128, 256) stepped 16 times + linear, B=64", Loop, seq),
    ]


def tiny_problems() -> list[tuple[str, object, object]]:
    """Small models whose step is host work only (batch 8)."""

    def mlp(layers: int) -> nn.Module:
        mods: list[nn.Module] = []
        for _ in range(layers - 1):
            mods += [nn.Linear(16, 16), nn.ReLU()]
        return nn.Sequential(*mods, nn.Linear(16, 4))

    def prenorm() -> nn.Module:
        return nn.Sequential(
            *[m for _ in range(6) for m in (nn.LayerNorm(16), nn.Linear(16, 16))],
            nn.Flatten(),
            nn.Linear(4 * 16, 4),
        )

    def encoder() -> nn.Module:
        return nn.Sequential(
            *[
                nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                for _ in range(2)
            ],
            nn.Flatten(),
            nn.Linear(4 * 16, 4),
        )

    def seq() -> nn.Module:
        return nn.Sequential(
            *[m for _ in range(12) for m in (nn.Linear(16, 16), nn.GELU())],
            nn.Flatten(),
            nn.Linear(4 * 16, 4),
        )

    def cnn() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 4),
        )

    def data(*shape: int):
        return lambda: (torch.randn(8, *shape), torch.randint(0, 4, (8,)))

    return [
        ("tiny MLP, 3 layers of 16", lambda: mlp(3), data(16)),
        ("tiny MLP, 33 layers of 16", lambda: mlp(33), data(16)),
        ("tiny Linear stack on [B, 4, 16], 12 layers + 1", seq, data(4, 16)),
        ("tiny pre-norm stack on [B, 4, 16], 6 x (LayerNorm, Linear) + 1", prenorm, data(4, 16)),
        ("tiny torch TransformerEncoderLayer x 2 on [B, 4, 16] + 1", encoder, data(4, 16)),
        ("tiny CNN, 2 conv + 1 linear", cnn, data(1, 8, 8)),
    ]


def extract_old(rev: str, into: str) -> None:
    """``src/sgdlab`` at ``rev`` as the package ``sgdlab_old`` under ``into``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "archive", rev, "src/sgdlab"], cwd=root, check=True, capture_output=True
    ).stdout
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
    calls = [
        (
            True,
            True,
            torch.float32,
            torch.randn(256, i, device=dev),
            torch.randn(256, o, device=dev),
        )
        for i, o in [(784, 512), (512, 512), (512, 10)]
    ]
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


def main() -> None:  # noqa: C901
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="HEAD~1", help="git revision to compare with")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help="small models whose step is host work only (see the docstring)",
    )
    ap.add_argument(
        "--decoder",
        action="store_true",
        help="a transposed-convolution decoder and an LSTMCell loop (docstring)",
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp(prefix="sgdlab_old_")
    extract_old(args.old, tmp)
    sys.path.insert(0, tmp)
    import sgdlab_old.stats as old

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(
        f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}; "
        f"torch {torch.__version__}; old = {args.old}"
    )
    if dev.type == "cuda":
        flush_timing(dev)
    problems = (
        tiny_problems()
        if args.tiny
        else decoder_problems()
        if args.decoder
        else ab.problems(args.quick)
    )
    for name, make, data in problems:
        torch.manual_seed(0)
        x, y = (t.to(dev) for t in data())
        base = make().to(dev)
        variants = {}
        for v in ("plain", "old", "new", "new, torch ops", "floor"):
            m = make().to(dev)
            m.load_state_dict(base.state_dict())
            if v == "old":
                old.track(m)
            elif v == "floor":
                try:
                    Floor(m)
                except ValueError:
                    continue  # a model with other layers: no floor probe
            elif v != "plain":
                new.track(m)
            variants[v] = (m, v == "new, torch ops")
        ref = None
        diffs = {}
        failed = {}
        for v, (m, off) in list(variants.items()):
            if v == "plain":
                continue
            try:
                step(m, x, y, off)
            except Exception as e:  # e.g. the earlier commit cannot handle this model
                failed[v] = f"{type(e).__name__}: {e}".splitlines()[0][:120]
                del variants[v]
                continue
            ms = [p.grad_second_moment.double() for p in m.parameters()]
            if ref is None:
                ref = ms
            else:
                diffs[v] = max(
                    float((u - w).abs().max() / w.abs().max()) for u, w in zip(ms, ref, strict=True)
                )
        names = list(variants)
        for _ in range(20):
            for n in names:
                step(variants[n][0], x, y, variants[n][1])
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
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
        for n, why in failed.items():
            print(f"| {n} | failed: {why} |  |  |")


if __name__ == "__main__":
    main()
