"""Where the augmented backward's extra time goes: host work or device work.

For the benchmark's models (``augmented_backward.py``: MLP, CNN, transformer block) the script
profiles a number of training steps of ``plain`` and of ``sgdlab`` with ``torch.profiler`` and
reports, per step and per method:

* wall time (the host's view, synchronised at the end of each step);
* device busy time (sum of the durations of the device kernels and copies; CUDA only);
* number of device launches and of torch operator calls on the host;
* the operators that account for sgdlab's extra host time (self time, sgdlab minus plain).

A step whose wall time is well above its device busy time is bound by the host (launches and
Python): the extra time then follows the number of launches and operator calls, not their
arithmetic. A step near its device busy time is bound by the device: the extra time follows the
extra kernels' durations, listed too.

Run::

    python benchmarks/augmented_backward_profile.py             # CUDA if available, else CPU
    python benchmarks/augmented_backward_profile.py --cpu --steps 5 --quick
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict

import torch
from augmented_backward import ce, problems
from torch.profiler import ProfilerActivity, profile

import sgdlab.stats as stats


def _steps(model, x, y, dev, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        model.zero_grad(set_to_none=True)
        ce(model(x), y).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def measure(model, x, y, dev, steps: int) -> dict:
    """Profile ``steps`` steps (after a warm-up): wall time per step, device busy time, launch
    and operator counts, host self time per operator."""
    _steps(model, x, y, dev, 5)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        wall = _steps(model, x, y, dev, steps)
    busy = 0.0
    launches = 0
    kernels: dict[str, float] = defaultdict(float)
    host: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    ops = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            busy += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            launches += 1
            kernels[e.name] += e.device_time_total if hasattr(e, "device_time_total") else 0.0
        elif e.name.startswith("aten::"):
            host[e.name] += e.self_cpu_time_total
            calls[e.name] += 1
            ops += 1
    return {
        "wall_us": wall * 1e6,
        "busy_us": busy / steps,
        "launches": launches / steps,
        "ops": ops / steps,
        "host": {k: v / steps for k, v in host.items()},
        "calls": {k: v / steps for k, v in calls.items()},
        "kernels": {k: v / steps for k, v in kernels.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(
        f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}; "
        f"torch {torch.__version__}; {args.steps} profiled steps per method"
    )
    for name, make, data in problems(args.quick):
        torch.manual_seed(0)
        model = make().to(dev)
        x, y = (t.to(dev) for t in data())
        plain = measure(model, x, y, dev, args.steps)
        with stats.track(model, warn_fallback=False):
            aug = measure(model, x, y, dev, args.steps)
        print(f"\n## {name}\n")
        print("| method | wall (us) | device busy (us) | device launches | torch ops |")
        print("|---|---:|---:|---:|---:|")
        for mname, r in (("plain", plain), ("sgdlab", aug)):
            print(
                f"| {mname} | {r['wall_us']:.0f} | {r['busy_us']:.0f} | "
                f"{r['launches']:.0f} | {r['ops']:.0f} |"
            )
        extra = {k: v - plain["host"].get(k, 0.0) for k, v in aug["host"].items()}
        print(f"\nsgdlab's extra host self time by operator (top {args.top}, us per step):")
        for k, v in sorted(extra.items(), key=lambda kv: -kv[1])[: args.top]:
            dc = aug["calls"][k] - plain["calls"].get(k, 0)
            print(f"  {k:40s} {v:8.1f}   calls +{dc:.0f}")
        if dev.type == "cuda":
            kx = {k: v - plain["kernels"].get(k, 0.0) for k, v in aug["kernels"].items()}
            print(f"sgdlab's extra device time by kernel (top {args.top}, us per step):")
            for k, v in sorted(kx.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"  {k[:60]:60s} {v:8.1f}")


if __name__ == "__main__":
    main()
