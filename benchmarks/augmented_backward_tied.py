"""Benchmark: peak memory and step time of a language model whose output head is tied to its
embedding (GPT-2, T5, BERT's MLM head), plain against sgdlab (and an earlier commit).

The tied weight is used twice in a pass, so its per-example gradients are summed over both uses
before squaring. The embedding's per-example gradient touches only its tokens' rows, the head's
is dense; a dense ``[B, vocabulary, dim]`` tensor per use costs ``B * V * d`` floats. Each
variant runs in a fresh process (``--variant``) and reports the peak resident set size of one
training step over the model's own baseline (after a warm-up step, on the CPU), and the median
step time over ``--steps`` steps.

Run::

    PYTHONPATH=src python benchmarks/augmented_backward_tied.py --old 8a0f1ce
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class TiedLM(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.block = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.block(self.emb(idx)))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args: argparse.Namespace) -> dict:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = TiedLM(args.vocab, args.d)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    if args.variant == "old":
        sys.path.insert(0, args.old_path)
        import sgdlab_old.stats as st  # noqa: PLC0415
    else:
        import sgdlab.stats as st  # noqa: PLC0415
    if args.variant != "plain":
        st.track(model)

    def step():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()

    step()
    base = _peak_mib()  # ru_maxrss only grows: the warm-up step's peak is the baseline
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {
        "variant": args.variant,
        "peak_mib": _peak_mib(),
        "warm_peak_mib": base,
        "step_ms": statistics.median(times) * 1e3,
    }
    if args.variant != "plain":
        out["moment_sum"] = float(model.emb.weight.grad_second_moment.double().sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--old", default=None, help="also the tracker at this git revision")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--old-path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = ["plain", "sgdlab"]
    old_path = None
    if args.old:
        from augmented_backward_ab import extract_old  # noqa: PLC0415

        old_path = tempfile.mkdtemp(prefix="sgdlab_old_")
        extract_old(args.old, old_path)
        variants.append("old")
    rows = []
    for v in variants:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            v,
            "--vocab",
            str(args.vocab),
            "--d",
            str(args.d),
            "--seq",
            str(args.seq),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
        ]
        if old_path:
            cmd += ["--old-path", old_path]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    plain = rows[0]
    dense = args.batch * args.vocab * args.d * 4 / 2**20
    print(
        f"tied LM: vocabulary {args.vocab}, d={args.d}, T={args.seq}, B={args.batch}, one "
        f"encoder layer; a dense [B, V, d] float32 tensor is {dense:.0f} MiB; old = {args.old}"
    )
    print(
        "| variant | peak RSS (MiB) | over plain (MiB) | median step (ms) | ratio to plain "
        "| sum of the tied weight's moment |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['peak_mib']:.0f} | {r['peak_mib'] - plain['peak_mib']:.0f} "
            f"| {r['step_ms']:.1f} | {r['step_ms'] / plain['step_ms']:.2f} | "
            f"{r.get('moment_sum', float('nan')):.6g} |"
        )


if __name__ == "__main__":
    main()
