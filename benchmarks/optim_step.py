"""Optimizer step time: sgdlab's fused path against torch.optim and the memory-bandwidth bound.

An optimizer step is memory-bound, so the reference time is the bound: the bytes the update
must read and write (Adam: parameter, gradient, two moments read, three written, 28 bytes per
float32 parameter; SGD with momentum 20; RMSProp 20) divided by the copy bandwidth measured in
the same run (the best of the in-place ``torch.add(a, b, out=a)`` on buffers larger than the
caches, 12 bytes per element, once before and, as a probe moving the step's bytes, in every
round). For each algorithm and parameter layout every implementation runs in the same
process on its own copy of the parameters; rounds interleave the implementations (rotating
order) so machine load affects all alike, and the table gives medians over the rounds.

The first table of each run gives the three figures of the fused step as users call it,
each against torch's fused step in the same rounds (paired median ratio) and beside its
bandwidth floor (bytes the step must move / the copy bandwidth measured in the same run):
the kernel (gradients kept as views of the flat buffer, ``nonfinite="ignore"``), the default
non-finite check (``nonfinite="raise"``: one more read of the gradients, 4 of Adam's 32 bytes
per parameter) and the loop users write (``zero_grad()`` with torch's default
``set_to_none=True``: a fresh gradient tensor per parameter each step, here a clone made
before the timed step, and the default check), against torch fused with the same fresh
gradients.

Implementations: torch.optim for-loop (``foreach=False``), foreach, fused (where torch has
one, also with fresh gradients); sgdlab ``fused=True`` with gradients left as views of its
flat buffer (a training loop with ``zero_grad(set_to_none=False)``), with fresh gradients
each step (read in place where large, copied where small), each with and without the
default non-finite check; sgdlab ``foreach=True``; on CUDA, sgdlab ``capturable=True`` stepped
eagerly and captured in a CUDA graph, beside torch's fused capturable Adam in a graph (the step
without any host work). All sgdlab rows but the check and users'-loop ones
use ``nonfinite="ignore"`` (torch checks nothing). For transformer shapes, a row splits the
parameters into two param groups (matrices, vectors: two kernel launches). The
first sgdlab step (flat buffers built and kernel compiled) is timed separately and reported,
and so is every kernel variant's first-call (compile) time.

Usage::

    python benchmarks/optim_step.py                      # CPU: 10M in 40 tensors + transformer
    python benchmarks/optim_step.py --device cuda         # GPU: 100M, 1B + GPT-2 small shapes
    python benchmarks/optim_step.py --algos adam --rounds 20 --layouts flat10m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

import sgdlab
from sgdlab.optim import _fast

BYTES_PER_PARAM = {"adam": 28, "sgd": 20, "rmsprop": 20}
#: the non-finite check reads each float32 gradient once more
CHECK_BYTES = 4

#: the headline rows: (row, its torch anchor, whether it pays the check's read)
HEADLINE = (
    ("sgdlab fused, grads as views", "torch fused", False),
    ("sgdlab fused, nonfinite check", "torch fused", True),
    ("sgdlab fused, users' loop", "torch fused, fresh grads", True),
)


# ---------------------------------------------------------------- parameter layouts
def flat_layout(total: int, n: int) -> list[tuple[int, ...]]:
    """``n`` tensors of about ``total / n`` elements (alternating matrix and vector shapes)."""
    per = total // n
    shapes = []
    for i in range(n):
        if i % 2 == 0 and per >= 1024:
            shapes.append((1024, per // 1024))
        else:
            shapes.append((per,))
    return shapes


def transformer_layout(vocab: int, ctx: int, d: int, layers: int) -> list[tuple[int, ...]]:
    """A GPT-2-style parameter list: embeddings, per block LN, qkv, proj, LN, MLP, final LN."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),
            (3 * d, d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (4 * d, d),
            (4 * d,),
            (d, 4 * d),
            (d,),
        ]
    shapes += [(d,), (d,)]
    return shapes


LAYOUTS = {
    "flat10m": ("10M in 40 tensors", lambda: flat_layout(10_000_000, 40)),
    "flat100m": ("100M in 40 tensors", lambda: flat_layout(100_000_000, 40)),
    "flat1b": ("1B in 40 tensors", lambda: flat_layout(1_000_000_000, 40)),
    "tiny-gpt": (
        "transformer d=256, 6 layers, vocab 8192 (7.0M in 76 tensors)",
        lambda: transformer_layout(8192, 512, 256, 6),
    ),
    "gpt2-small": (
        "GPT-2 small shapes (124M in 148 tensors)",
        lambda: transformer_layout(50257, 1024, 768, 12),
    ),
}


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, numel: int, rounds: int) -> float:
    """Bytes per second of the in-place ``torch.add(a, b, out=a)`` (two reads, one write to
    a location just read: the access pattern of an in-place optimizer step), best of
    ``rounds``: the most the memory system gave this process in this run."""
    a = torch.zeros(numel, device=device)
    b = torch.rand(numel, device=device)
    for _ in range(3):
        torch.add(a, b, out=a)
    times = [timed(lambda: torch.add(a, b, out=a), device) for _ in range(rounds)]
    return 12 * numel / min(times)


# ---------------------------------------------------------------- implementations
def torch_optimizer(algo: str, params, mode: str):
    kw = {mode: True} if mode != "forloop" else {"foreach": False}
    if algo == "adam":
        return torch.optim.Adam(params, lr=1e-3, **kw)
    if algo == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kw)
    return torch.optim.RMSprop(params, lr=1e-3, **kw)


def sgdlab_optimizer(algo: str, params, **kw):
    if algo == "adam":
        return sgdlab.Adam(params, lr=1e-3, **kw)
    if algo == "sgd":
        return sgdlab.SGD(params, lr=1e-3, momentum=0.9, **kw)
    return sgdlab.RMSProp(params, lr=1e-3, **kw)


def two_groups(params) -> list[dict]:
    """Matrices and vectors in two param groups (as for a decay / no-decay split), with equal
    hyperparameters so the parameters must still agree with the other rows: the cost of a
    second kernel launch and a second host-side pass, nothing else."""
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2]},
    ]


def torch_has_fused(algo: str, device: torch.device) -> bool:
    if algo == "rmsprop":
        return False
    try:
        p = torch.zeros(4, device=device, requires_grad=True)
        p.grad = torch.zeros_like(p)
        torch_optimizer(algo, [p], "fused").step()
        return True
    except (RuntimeError, ValueError):
        return False


class Impl:
    """One implementation: its parameters, gradients, optimizer and how a step is prepared."""

    def __init__(self, name: str, shapes, grads, device, make_opt, fresh_grads: bool = False):
        self.name = name
        self.params = [torch.zeros(s, device=device).requires_grad_() for s in shapes]
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.copy_(g).mul_(0.5)
        self.grads = grads
        self.fresh_grads = fresh_grads
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt = make_opt(self.params)
        self.times: list[float] = []
        self.first: float | None = None

    def prepare(self) -> None:
        if self.fresh_grads:  # a new gradient tensor each step, as backward after set_to_none
            for p, g in zip(self.params, self.grads):
                p.grad = g.clone()

    def step(self) -> None:
        self.opt.step()


class GraphImpl(Impl):
    """``opt.step()`` captured in a CUDA graph: the first three calls step eagerly on a side
    stream (compilation, buffers, warm-up), the fourth captures the step and replays it (so the
    step count stays that of the other rows), later calls replay the graph: no host work."""

    def __init__(self, name: str, shapes, grads, device, make_opt) -> None:
        super().__init__(name, shapes, grads, device, make_opt)
        self.calls = 0
        self.graph = None

    def step(self) -> None:
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return
        if self.calls <= 3:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.opt.step()
            torch.cuda.current_stream().wait_stream(side)
            return
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.opt.step()
        self.graph.replay()


class Probe:
    """The bound, measured in the same rounds: an in-place ``torch.add(a, b, out=a)`` moving
    the step's bytes (12 bytes per element; on a buffer capped at ``cap`` elements, its time
    scaled up linearly)."""

    def __init__(self, nbytes: int, device: torch.device, cap: int) -> None:
        self.name = "bound probe (in-place add, same bytes)"
        n = nbytes // 12
        self.scale = max(1.0, n / cap)
        n = min(n, cap)
        self.a = torch.zeros(n, device=device)
        self.b = torch.rand(n, device=device)
        self.times: list[float] = []
        self.first = 0.0

    def prepare(self) -> None:
        pass

    def step(self) -> None:
        torch.add(self.a, self.b, out=self.a)


def bench(
    algo: str, layout: str, device: torch.device, rounds: int, full: bool, bandwidth: float
) -> dict:
    title, make_shapes = LAYOUTS[layout]
    shapes = make_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(s, device=device, generator=gen) * 1e-2 for s in shapes]

    impls: list[Impl] = []
    if full:
        impls.append(
            Impl(
                "torch for-loop",
                shapes,
                grads,
                device,
                lambda ps: torch_optimizer(algo, ps, "forloop"),
            )
        )
        impls.append(
            Impl(
                "torch foreach",
                shapes,
                grads,
                device,
                lambda ps: torch_optimizer(algo, ps, "foreach"),
            )
        )
    if torch_has_fused(algo, device):
        impls.append(
            Impl(
                "torch fused", shapes, grads, device, lambda ps: torch_optimizer(algo, ps, "fused")
            )
        )
        impls.append(
            Impl(
                "torch fused, fresh grads",
                shapes,
                grads,
                device,
                lambda ps: torch_optimizer(algo, ps, "fused"),
                fresh_grads=True,
            )
        )
    elif not full:
        impls.append(
            Impl(
                "torch foreach",
                shapes,
                grads,
                device,
                lambda ps: torch_optimizer(algo, ps, "foreach"),
            )
        )
    impls.append(
        Impl(
            "sgdlab fused, grads as views",
            shapes,
            grads,
            device,
            lambda ps: sgdlab_optimizer(algo, ps, fused=True, nonfinite="ignore"),
        )
    )
    impls.append(
        Impl(
            "sgdlab fused, nonfinite check",
            shapes,
            grads,
            device,
            lambda ps: sgdlab_optimizer(algo, ps, fused=True),
        )
    )
    impls.append(
        Impl(
            "sgdlab fused, users' loop",
            shapes,
            grads,
            device,
            lambda ps: sgdlab_optimizer(algo, ps, fused=True),
            fresh_grads=True,
        )
    )
    impls.append(
        Impl(
            "sgdlab fused, fresh grads",
            shapes,
            grads,
            device,
            lambda ps: sgdlab_optimizer(algo, ps, fused=True, nonfinite="ignore"),
            fresh_grads=True,
        )
    )
    if full and layout in ("tiny-gpt", "gpt2-small"):
        # the usual transformer split into matrices and vectors: two kernel launches
        impls.append(
            Impl(
                "sgdlab fused, 2 param groups",
                shapes,
                grads,
                device,
                lambda ps: sgdlab_optimizer(algo, two_groups(ps), fused=True, nonfinite="ignore"),
            )
        )
    if device.type == "cuda" and algo != "sgd":
        # device-side step counts and bias corrections: the step can be captured
        impls.append(
            Impl(
                "sgdlab capturable",
                shapes,
                grads,
                device,
                lambda ps: sgdlab_optimizer(algo, ps, capturable=True),
            )
        )
        impls.append(
            GraphImpl(
                "sgdlab capturable, CUDA graph",
                shapes,
                grads,
                device,
                lambda ps: sgdlab_optimizer(algo, ps, capturable=True),
            )
        )
        if torch_has_fused(algo, device):
            impls.append(
                GraphImpl(
                    "torch fused capturable, CUDA graph",
                    shapes,
                    grads,
                    device,
                    lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True, capturable=True),
                )
            )
    if full:
        impls.append(
            Impl(
                "sgdlab foreach",
                shapes,
                grads,
                device,
                lambda ps: sgdlab_optimizer(algo, ps, foreach=True, nonfinite="ignore"),
            )
        )

    cap = 250_000_000 if device.type == "cuda" else 50_000_000
    probe = Probe(BYTES_PER_PARAM[algo] * numel, device, cap)
    impls.append(probe)  # type: ignore[arg-type]
    for im in impls:  # first step: state allocation, and for sgdlab buffers + compilation
        im.prepare()
        im.first = timed(im.step, device)
        for _ in range(2):
            im.prepare()
            im.step()
    for r in range(rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        for im in order:
            im.prepare()
            im.times.append(timed(im.step, device))

    probe.times = [t * probe.scale for t in probe.times]
    bound = min(BYTES_PER_PARAM[algo] * numel / bandwidth, min(probe.times))
    med = {im.name: statistics.median(im.times) for im in impls}
    anchor = (
        next(im for im in impls if im.name == "torch fused")
        if any(im.name == "torch fused" for im in impls)
        else next(im for im in impls if im.name == "torch foreach")
    )
    ref_params = anchor.params
    by_name = {im.name: im for im in impls}
    headline = []
    for name, anchor_name, checked in HEADLINE:
        if name not in by_name or anchor_name not in by_name:
            continue
        im, an = by_name[name], by_name[anchor_name]
        nbytes = (BYTES_PER_PARAM[algo] + (CHECK_BYTES if checked else 0)) * numel
        floor = nbytes / bandwidth
        headline.append(
            dict(
                name=name,
                anchor=anchor_name,
                median_ms=1e3 * med[name],
                anchor_ms=1e3 * med[anchor_name],
                vs_anchor=statistics.median(a / b for a, b in zip(im.times, an.times)),
                floor_ms=1e3 * floor,
                bytes_per_param=nbytes // numel,
                vs_floor=med[name] / floor,
                anchor_vs_floor=med[anchor_name] / floor,
            )
        )
    rows = []
    for im in impls:
        # every implementation made the same steps from the same start with the same
        # gradients: the parameters must agree (a check that the timed code is correct)
        diff = (
            float("nan")
            if isinstance(im, Probe)
            else max(
                (a.float() - b.float()).abs().max().item() for a, b in zip(im.params, ref_params)
            )
        )
        paired = statistics.median(a / b for a, b in zip(im.times, anchor.times))
        rows.append(
            dict(
                name=im.name,
                median_ms=1e3 * med[im.name],
                min_ms=1e3 * min(im.times),
                first_ms=1e3 * im.first,
                vs_anchor=paired,
                vs_probe=statistics.median(a / b for a, b in zip(im.times, probe.times)),
                min_vs_bound=min(im.times) / bound,
                max_diff=diff,
            )
        )
    del impls
    return dict(
        algo=algo,
        layout=layout,
        title=title,
        numel=numel,
        tensors=len(shapes),
        bound_ms=1e3 * bound,
        rows=rows,
        headline=headline,
    )


def headline_table(res: dict) -> str:
    """The three figures of the fused step as users call it, against torch fused and the
    bandwidth floor (medians over interleaved rounds)."""
    lines = [
        f"**{res['algo']}**, {res['title']}: the fused step as users call it",
        "",
        "| row | median ms | torch anchor | anchor median ms | x anchor (paired median) "
        "| floor ms (B/param) | x floor | anchor x floor |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for h in res["headline"]:
        lines.append(
            f"| {h['name']} | {h['median_ms']:.3f} | {h['anchor']} | "
            f"{h['anchor_ms']:.3f} | {h['vs_anchor']:.2f} | "
            f"{h['floor_ms']:.3f} ({h['bytes_per_param']}) | {h['vs_floor']:.2f} | "
            f"{h['anchor_vs_floor']:.2f} |"
        )
    return "\n".join(lines)


def table(res: dict) -> str:
    anchor = (
        "torch fused" if any(r["name"] == "torch fused" for r in res["rows"]) else ("torch foreach")
    )
    lines = [
        f"**{res['algo']}**, {res['title']}: bound {res['bound_ms']:.3f} ms "
        f"({BYTES_PER_PARAM[res['algo']]} B/param at the best bandwidth seen)",
        "",
        f"| implementation | median ms | min ms | x {anchor} (paired) | x probe (paired) "
        "| min x bound | first step ms | max abs diff of params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['name']} | {r['median_ms']:.3f} | {r['min_ms']:.3f} | "
            f"{r['vs_anchor']:.2f} | {r['vs_probe']:.2f} | {r['min_vs_bound']:.2f} | "
            f"{r['first_ms']:.0f} | {r['max_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--algos", default="adam,sgd,rmsprop")
    ap.add_argument(
        "--layouts",
        default=None,
        help="comma list of " + ", ".join(LAYOUTS) + " (default per device)",
    )
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    layouts = (
        args.layouts.split(",")
        if args.layouts
        else ["flat100m", "gpt2-small", "flat1b"]
        if cuda
        else ["flat10m", "tiny-gpt"]
    )
    rounds = args.rounds or (50 if cuda else 30)
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"# optimizer step benchmark: device {device} ({name}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, rounds {rounds}, load average {load}"
    )
    # CPU: 2 x 256 MiB, larger than the last-level cache (260 MiB on the 2-core CI machine)
    bw = copy_bandwidth(device, 250_000_000 if cuda else 64_000_000, rounds)
    print(
        f"copy bandwidth (in-place torch.add, 12 B/elem, best of {rounds}): {bw / 1e9:.1f} GB/s\n"
    )
    results = []
    for layout in layouts:
        full = layout != "flat1b"  # 1B: torch fused and sgdlab fused only (memory), Adam only
        for algo in args.algos.split(",") if full else ["adam"]:
            res = bench(algo, layout, device, rounds if full else max(10, rounds // 3), full, bw)
            results.append(res)
            if res["headline"]:
                print(headline_table(res) + "\n", flush=True)
            print(table(res) + "\n", flush=True)
            if cuda:
                torch.cuda.empty_cache()
    print("first-call (compile) seconds per kernel variant:")
    for key, sec in _fast.COMPILE_SECONDS.items():
        print(f"  {key[0]} {key[2]} {key[3]}: {sec:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                dict(device=str(device), name=name, bandwidth=bw, results=results), fh, indent=1
            )


if __name__ == "__main__":
    main()
