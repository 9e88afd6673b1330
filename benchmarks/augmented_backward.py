"""Benchmark: cost of the augmented backward (per-example second moments) against peers.

For each model the script times one training step (forward + backward, statistics included)
and measures its peak memory, in the same run, for:

* ``plain``    ordinary backward (``p.grad`` only), the baseline of every ratio;
* ``sgdlab``   ``sgdlab.stats.track``: ``p.grad`` and ``p.grad_second_moment``;
* ``backpack`` BackPACK ``SumGradSquared`` (rescaled to the batch mean);
* ``opacus``   Opacus ``GradSampleModule`` (per-example gradients) + square-and-mean;
* ``func``     ``torch.func.vmap(grad(...))`` per-example gradients + square-and-mean.

Every method's second moment is checked against sgdlab's (max relative error over parameters).
Missing peers give a row saying "not installed"; a peer that cannot handle a model, "unsupported"
with the reason. Each method first runs alone (warm-up, peak memory, agreement); then all
methods of a model are timed together, one step of each per round in a rotating order, so that a
change of the machine's load hits them alike. Reported: median step time over rounds, the
median over rounds of (time / plain's time in the same round), and peak memory allocated during
a step (CUDA only: model, data, gradients, statistics and temporaries) with its ratio to
plain's.

Run::

    python benchmarks/augmented_backward.py            # CUDA if available, else CPU
    python benchmarks/augmented_backward.py --quick    # small sizes, for a smoke run on CPU

Loss: cross-entropy, mean over the batch (for the transformer block, mean over the tokens, i.e.
the batch mean of each sequence's mean token loss).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sgdlab.stats as stats

# --------------------------------------------------------------------------- models


class Layer(nn.Module):
    """Pre-norm transformer layer: causal self-attention and a GELU MLP, with residuals."""

    def __init__(self, d: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, -1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Block(Layer):
    """The benchmark's transformer block: a :class:`Layer` and a token readout."""

    def __init__(self, d: int = 256, heads: int = 4, vocab: int = 64) -> None:
        super().__init__(d, heads)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(super().forward(x))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def problems(quick: bool) -> list[tuple[str, Callable[[], nn.Module], Callable[[], tuple]]]:
    b = 32 if quick else 256
    bt, t = (4, 16) if quick else (32, 128)
    return [
        (
            f"MLP 784-512-512-10, B={b}",
            mlp,
            lambda: (torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))),
        ),
        (
            f"CNN 2 conv + 2 linear, B={b}",
            cnn,
            lambda: (torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))),
        ),
        (
            f"Transformer block d=256, T={t}, B={bt}",
            Block,
            lambda: (torch.randn(bt, t, 256), torch.randint(0, 64, (bt, t))),
        ),
    ]


def ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# --------------------------------------------------------------------------- methods
# Each method: setup(model) -> (step() -> None, moments() -> list[Tensor], teardown()).


def m_plain(model, x, y):
    def step():
        model.zero_grad(set_to_none=True)
        ce(model(x), y).backward()

    return step, None, lambda: None


def m_sgdlab(model, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model)

    def step():
        model.zero_grad(set_to_none=True)
        ce(model(x), y).backward()

    def moments():
        return [p.grad_second_moment for p in model.parameters()]

    return step, moments, tracker.detach


def m_sgdlab_grouped(model, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model, conv_strategy="grouped")

    def step():
        model.zero_grad(set_to_none=True)
        ce(model(x), y).backward()

    def moments():
        return [p.grad_second_moment for p in model.parameters()]

    return step, moments, tracker.detach


def m_backpack(model, x, y):
    try:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared
    except ImportError as e:
        raise ModuleNotFoundError("not installed") from e
    ext = extend(model)
    lossf = extend(nn.CrossEntropyLoss())
    B = x.shape[0]

    def step():
        ext.zero_grad(set_to_none=True)
        out = ext(x)
        with backpack(SumGradSquared()):
            lossf(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()

    def moments():
        # sum_b (g_b / B)^2 for a mean-reduced loss -> (1/B) sum_b g_b^2
        return [p.sum_grad_squared * B for p in ext.parameters()]

    def teardown():
        from backpack import disable

        with contextlib.suppress(Exception):
            disable()

    return step, moments, teardown


def m_opacus(model, x, y):
    try:
        from opacus import GradSampleModule
    except ImportError as e:
        raise ModuleNotFoundError("not installed") from e
    gsm = GradSampleModule(model, loss_reduction="mean")

    def step():
        gsm.zero_grad(set_to_none=True)
        ce(gsm(x), y).backward()
        for p in gsm.parameters():
            p.grad_second_moment = p.grad_sample.pow(2).mean(0)
            p.grad_sample = None

    def moments():
        return [p.grad_second_moment for p in gsm.parameters()]

    return step, moments, lambda: gsm._close() if hasattr(gsm, "_close") else None


def m_func(model, x, y):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xb, yb):
        out = functional_call(model, p, (xb.unsqueeze(0),))
        return ce(out, yb.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))
    store: dict[str, Tensor] = {}

    def step():
        g = per(params, x, y)
        for k, v in g.items():
            store[k] = v.pow(2).mean(0)
            _ = v.mean(0)  # the gradient itself

    def moments():
        return [store[k] for k in params]

    return step, moments, lambda: None


METHODS = [
    ("plain", m_plain),
    ("sgdlab", m_sgdlab),
    ("sgdlab, conv_strategy=grouped", m_sgdlab_grouped),
    ("backpack", m_backpack),
    ("opacus", m_opacus),
    ("func", m_func),
]

# --------------------------------------------------------------------------- measurement


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(step, dev, warmup: int) -> float | None:
    """Warm ``step`` up; on CUDA return the peak memory (MiB) allocated during one step."""
    for _ in range(warmup):
        step()
    sync(dev)
    if dev.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    step()
    sync(dev)
    return torch.cuda.max_memory_allocated() / 2**20


def time_interleaved(
    steps: dict[str, Callable[[], None]], dev: torch.device, warmup: int, repeat: int
) -> dict[str, tuple[float, float]]:
    """Median step time of every method and median over rounds of its time / plain's time.

    Each round times one step of every method, in an order rotated from round to round, so a
    change of the machine's load hits all methods alike and the paired ratio cancels it."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync(dev)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync(dev)
            t0 = time.perf_counter()
            steps[name]()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    base = times["plain"]
    return {
        n: (statistics.median(ts), statistics.median(t / b for t, b in zip(ts, base)))
        for n, ts in times.items()
    }


def rel_err(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((u - v).abs().max() / v.abs().max().clamp_min(1e-30)) for u, v in zip(a, b))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:  # noqa: C901
    """Per model: each method alone (warm-up, peak memory, agreement with sgdlab), then every
    method that ran, set up again side by side and timed interleaved round by round."""
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name, make, data in problems(args.quick):
        torch.manual_seed(0)
        base = make().to(dev)
        x, y = (t.to(dev) for t in data())
        ref = None
        plain_m = None
        ok: list[tuple[str, Any]] = []
        model_rows: list[dict[str, Any]] = []
        for mname, method in METHODS:
            if "grouped" in mname and not name.startswith("CNN"):
                continue
            model = make().to(dev)
            model.load_state_dict(base.state_dict())
            row: dict[str, Any] = {"model": name, "method": mname}
            model_rows.append(row)
            try:
                step, moments, teardown = method(model, x, y)
            except ModuleNotFoundError:
                row["note"] = "not installed"
                continue
            try:
                peak = peak_memory(step, dev, args.warmup)
                row["peak_mib"] = peak
                if mname == "plain":
                    plain_m = peak
                if peak is not None and plain_m:
                    row["mem_ratio"] = peak / plain_m
                if moments is not None:
                    ms = [m.detach().double().cpu() for m in moments()]
                    if mname == "sgdlab":
                        ref = ms
                    elif ref is not None:
                        row["rel_err"] = rel_err(ms, ref)
                ok.append((mname, method))
            except Exception as e:  # a peer that cannot handle this model
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:90]
                row.clear()
                row.update(model=name, method=mname, note="unsupported (" + msg + ")")
            finally:
                with contextlib.suppress(Exception):
                    teardown()
            del model, step, moments, teardown
            _free(dev)
        # timing: every method that ran, set up again side by side
        live = {}
        for mname, method in ok:
            model = make().to(dev)
            model.load_state_dict(base.state_dict())
            live[mname] = method(model, x, y)
        timed = time_interleaved({n: v[0] for n, v in live.items()}, dev, args.warmup, args.repeat)
        for row in model_rows:
            if row["method"] in timed:
                row["time_ms"] = timed[row["method"]][0] * 1e3
                row["ratio"] = timed[row["method"]][1]
        rows.extend(model_rows)
        for _, _, teardown in live.values():
            with contextlib.suppress(Exception):
                teardown()
        del live
        _free(dev)
    return rows


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def table(rows: list[dict[str, Any]], dev: str) -> str:
    lines = [
        "| model | method | median step (ms) | ratio to plain | peak mem (MiB) "
        "| mem ratio | max rel. err vs sgdlab | note |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {f(r.get('time_ms'), '.3f')} | "
            f"{f(r.get('ratio'), '.2f')} | {f(r.get('peak_mib'), '.1f')} | "
            f"{f(r.get('mem_ratio'), '.2f')} | {f(r.get('rel_err'), '.1e')} | "
            f"{r.get('note', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # peers' and vmap's performance notices
    rows = run(args)
    dev = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available() and not args.cpu
        else platform.processor() or "CPU"
    )
    print(f"device: {dev}; torch {torch.__version__}; float32, TF32 off")
    print(table(rows, dev))


if __name__ == "__main__":
    main()
