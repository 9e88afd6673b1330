"""Benchmark: the augmented backward under activation checkpointing.

A stack of pre-norm transformer blocks (LayerNorm, fused q/k/v projection, causal
``scaled_dot_product_attention``, output projection, GELU MLP), each block wrapped in
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` or not. For ``plain`` (no
tracker, the anchor), ``sgdlab`` (this tree) and, with ``--old REV``, ``old`` (the tracker at an
earlier commit), the script reports:

* memory held at the end of the forward pass (what the backward pass will need): on CUDA
  ``torch.cuda.memory_allocated()`` after the forward minus before; on the CPU the growth of the
  resident set (glibc is told to return large blocks at once, so freed tensors leave it);
* the median step time (forward + backward) over interleaved rounds, and its ratio to plain's
  in the same checkpointing mode;
* the largest difference of ``grad_second_moment`` between ``sgdlab`` with and without
  checkpointing (0: the same kernels on the same numbers).

Run::

    python benchmarks/augmented_backward_checkpoint.py                # CUDA if available
    python benchmarks/augmented_backward_checkpoint.py --cpu --old 8a0f1ce
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from augmented_backward import Layer
from augmented_backward_ab import extract_old
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import sgdlab.stats as new


class Stack(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, vocab: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Layer(d, heads) for _ in range(layers)])
        self.head = nn.Linear(d, vocab)
        self.ckpt = False

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.ckpt else blk(x)
        return self.head(x)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _held(model, x, y, dev) -> float:
    """MiB held at the end of the forward pass (then the backward pass runs)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = torch.cuda.memory_allocated() if dev.type == "cuda" else _rss()
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    gc.collect()
    after = torch.cuda.memory_allocated() if dev.type == "cuda" else _rss()
    loss.backward()
    return (after - before) / 2**20


def _step(model, x, y, dev) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    ap.add_argument("--old", default=None, help="also the tracker at this git revision")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if dev.type == "cpu":  # glibc: blocks from 64 KiB are mapped and unmapped at once
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    torch.backends.cuda.matmul.allow_tf32 = False
    trackers = {"plain": None, "sgdlab": new}
    if args.old:
        tmp = tempfile.mkdtemp(prefix="sgdlab_old_")
        extract_old(args.old, tmp)
        sys.path.insert(0, tmp)
        import sgdlab_old.stats as old

        trackers["old"] = old
    torch.manual_seed(0)
    base = Stack(args.layers, args.d, 4, 64)
    x = torch.randn(args.batch, args.seq, args.d, device=dev)
    y = torch.randint(0, 64, (args.batch, args.seq), device=dev)
    print(
        f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}; "
        f"torch {torch.__version__}; {args.layers} blocks, d={args.d}, T={args.seq}, "
        f"B={args.batch}; old = {args.old}"
    )
    print(
        "| checkpointing | method | held after forward (MiB) | median step (ms) | ratio to plain |"
    )
    print("|---|---|---:|---:|---:|")
    moments = {}
    for ckpt in (False, True):
        models, handles, held = {}, {}, {}
        for name, mod in trackers.items():
            m = Stack(args.layers, args.d, 4, 64).to(dev)
            m.load_state_dict(base.state_dict())
            m.ckpt = ckpt
            if mod is not None:
                handles[name] = mod.track(m)
            for _ in range(2):
                _step(m, x, y, dev)
            held[name] = statistics.median(_held(m, x, y, dev) for _ in range(3))
            models[name] = m
        times: dict[str, list[float]] = {n: [] for n in models}
        names = list(models)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                _step(models[name], x, y, dev)
                times[name].append(time.perf_counter() - t0)
        for name in names:
            ratio = statistics.median(t / p for t, p in zip(times[name], times["plain"]))
            print(
                f"| {'per block' if ckpt else 'none'} | {name} | {held[name]:.1f} | "
                f"{statistics.median(times[name]) * 1e3:.1f} | {ratio:.2f} |"
            )
        moments[ckpt] = [p.grad_second_moment.clone() for p in models["sgdlab"].parameters()]
        for h in handles.values():
            h.detach()
    diff = max(float((a - b).abs().max()) for a, b in zip(moments[False], moments[True]))
    print(
        f"\nsgdlab, max |difference| of grad_second_moment with and without checkpointing: "
        f"{diff:.1e}"
    )


if __name__ == "__main__":
    main()
