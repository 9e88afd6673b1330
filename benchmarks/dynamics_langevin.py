"""Chains x steps per second for a 2-D Langevin SDE and 2-D SGD: sgdlab vs torchsde vs Python.

The SDE (Langevin model of SGD at learning rate eta, batch 1, on a 2-D quadratic):

    d Phi = -H Phi dt + sqrt(eta C) dW,   H = diag(1, 0.5),  C = diag(1, 2),  eta = 0.1,

integrated by Euler-Maruyama with dt = 0.01 for ``--steps`` steps over R chains, in float64,
one thread, by

* ``sgdlab.dynamics.simulate_langevin`` (statistics off: final states only, like the peers);
* ``sgdlab.dynamics.simulate_sgd`` on the same quadratic with additive Gaussian noise and
  lr = dt (SGD is Euler-Maruyama with dt = eta; its noise is per step, so the SDE differs by
  the temperature, the work per step does not);
* ``torchsde.sdeint(method="euler", dt=dt)`` with the same drift and diagonal diffusion
  (its default Brownian motion), returning the state at ``ts = [0, T]``;
* a plain Python loop (``random.gauss``), run on at most ``--python-chains`` chains.

Each timing is the best of ``--repeats`` runs. The check column is the largest relative error
of the final states' coordinate variances against the exact Euler-Maruyama value (discrete
Lyapunov; chains start at it), so every row simulates the same law.

Run (torchsde lives in a separate environment; it is a benchmark-only peer)::

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch==2.13.0 torchsde numpy scipy
    /tmp/benchvenv/bin/pip install --no-deps -e .
    /tmp/benchvenv/bin/python benchmarks/dynamics_langevin.py
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import time

import numpy as np
import torch

from sgdlab.dynamics import Quadratic, simulate_langevin, simulate_sgd, stationary_covariance

H = np.array([1.0, 0.5])
C = np.array([1.0, 2.0])
ETA = 0.1
DT = 0.01


def exact_variance(lr_noise: float, step: float) -> np.ndarray:
    """Stationary variance of e' = (1 - step h) e + sqrt(step * lr_noise * c) z, per coordinate."""
    return np.diag(stationary_covariance(np.diag(H), np.diag(lr_noise * C / step), step))


def init_states(R: int, var: np.ndarray, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, 2, generator=g, dtype=torch.float64) * torch.as_tensor(np.sqrt(var))


def run_sgdlab_langevin(R: int, steps: int) -> torch.Tensor:
    p = Quadratic(H, C)
    x0 = init_states(R, exact_variance(ETA, DT))
    return simulate_langevin(p, ETA, steps * DT, DT, R, init=x0, statistics=False, seed=1).final


def run_sgdlab_sgd(R: int, steps: int) -> torch.Tensor:
    p = Quadratic(H, C)
    x0 = init_states(R, exact_variance(DT, DT))
    return simulate_sgd(p, DT, 1, steps, R, init=x0, statistics=False, seed=1).final


def run_torchsde(R: int, steps: int) -> torch.Tensor:
    import torchsde

    h = torch.as_tensor(H)
    diff = torch.as_tensor(np.sqrt(ETA * C))

    class OU(torch.nn.Module):
        noise_type = "diagonal"
        sde_type = "ito"

        def f(self, t, y):
            return -y * h

        def g(self, t, y):
            return diff.expand_as(y)

    x0 = init_states(R, exact_variance(ETA, DT))
    ts = torch.tensor([0.0, steps * DT], dtype=torch.float64)
    with torch.no_grad():
        ys = torchsde.sdeint(OU(), x0, ts, method="euler", dt=DT)
    return ys[-1]


def run_python(R: int, steps: int) -> torch.Tensor:
    rnd = random.Random(1)
    a0, a1 = 1.0 - DT * H[0], 1.0 - DT * H[1]
    s0, s1 = math.sqrt(DT * ETA * C[0]), math.sqrt(DT * ETA * C[1])
    x0 = init_states(R, exact_variance(ETA, DT)).tolist()
    out = []
    for x, y in x0:
        for _ in range(steps):
            x = a0 * x + s0 * rnd.gauss(0.0, 1.0)
            y = a1 * y + s1 * rnd.gauss(0.0, 1.0)
        out.append((x, y))
    return torch.tensor(out, dtype=torch.float64)


def timed(fn, R: int, steps: int, repeats: int) -> tuple[float, torch.Tensor]:
    best, final = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        final = fn(R, steps)
        best = min(best, time.perf_counter() - t0)
    return best, final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chains", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--python-chains", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import torchsde

    print(
        f"# torch {torch.__version__}, torchsde {torchsde.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s), float64"
    )
    print(
        f"# 2-D OU/Langevin, Euler-Maruyama dt={DT}, {args.steps} steps; "
        "throughput = chains x steps / second (best of "
        f"{args.repeats})"
    )
    var_l, var_s = exact_variance(ETA, DT), exact_variance(DT, DT)
    header = (
        f"| {'method':<28} | {'chains':>6} | {'seconds':>8} | {'chain-steps/s':>13} | "
        f"{'vs torchsde':>11} | {'var check':>9} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    methods = [
        ("sgdlab simulate_langevin", run_sgdlab_langevin, var_l),
        ("sgdlab simulate_sgd", run_sgdlab_sgd, var_s),
        ("torchsde sdeint (euler)", run_torchsde, var_l),
        ("plain Python loop", run_python, var_l),
    ]
    for R in args.chains:
        rates = {}
        rows = []
        for name, fn, var in methods:
            r_here = min(R, args.python_chains) if fn is run_python else R
            sec, final = timed(fn, r_here, args.steps, 1 if fn is run_python else args.repeats)
            rate = r_here * args.steps / sec
            rates[name] = rate
            v = final.var(dim=0).numpy()
            check = float(np.max(np.abs(v / var - 1)))
            rows.append((name, r_here, sec, rate, check))
        for name, r_here, sec, rate, check in rows:
            ratio = rate / rates["torchsde sdeint (euler)"]
            print(
                f"| {name:<28} | {r_here:>6} | {sec:>8.3f} | {rate:>13.3e} | "
                f"{ratio:>10.1f}x | {check:>9.3f} |"
            )


if __name__ == "__main__":
    main()
