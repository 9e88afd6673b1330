"""Langevin dynamics of SGD by Euler-Maruyama, vectorised over chains; first-passage times.

The diffusion model of SGD with learning rate eta and batch B (time ``t = sum of learning
rates``) is the SDE

    d Phi = -P g(Phi) dt + sqrt(eta P Sigma P / B) dW,

with ``Sigma`` the per-example gradient covariance (constant ``C`` for additive noise, or
``Sigma(Phi)`` from the problem with ``diffusion="state"``) and ``P`` an optional fixed diagonal
preconditioner. Euler-Maruyama with step ``dt``:
``Phi_{k+1} = Phi_k - P g dt + sqrt(dt) L z_k``, ``L L^T = eta P Sigma P / B``. With additive
Gaussian noise SGD itself is this scheme with ``dt = eta``; a smaller ``dt`` approaches the
SDE (weak order 1). 1-D stationary law: ``p ∝ exp(-2 L / (eta sigma^2 / B))``.

Implementation: the noise is drawn in cache-sized blocks (numpy's ziggurat sampler on SFC64,
seeded from the torch generator) and pre-multiplied by ``L``; for affine gradients (quadratics) the
drift and the noise fuse into one ``addmm``/``addcmul`` per step.

Example::

    >>> from sgdlab.dynamics import Quartic, simulate_langevin
    >>> r = simulate_langevin(Quartic(), lr=0.1, time=20.0, dt=0.01, chains=200, seed=0)
    >>> r.final.shape
    torch.Size([200, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .._validation import check_batch_size, check_choice, check_count, check_positive
from ._common import (
    NormalBlocks,
    check_init,
    diagonal_or_none,
    expand_full,
    finite_or_raise,
    make_generator,
    psd_sqrt,
    resolve_dtype,
    scale_transform,
)
from .preconditioning import resolve_fixed_preconditioner
from .problems.base import Problem
from .result import ChainResult, _Accumulator

__all__ = ["first_passage_times", "simulate_langevin"]


def _steps(time: float, dt: float) -> int:
    steps = int(round(time / dt))
    if steps < 1 or abs(steps * dt - time) > 1e-9 * max(1.0, time):
        raise ValueError(f"time / dt must be a positive integer, got time={time}, dt={dt}")
    return steps


def _diffusion_factor(
    problem: Problem,
    lr: float,
    batch_size: int,
    pre: torch.Tensor | None,
    covariance: Any,
    dtype: torch.dtype,
) -> torch.Tensor:
    if covariance is None:
        if problem.noise_covariance is None:
            raise ValueError(f"{type(problem).__name__} has no noise_covariance; pass covariance")
        C = np.asarray(problem.noise_covariance, dtype=np.float64)
    else:
        from ._common import as_matrix

        C = as_matrix("covariance", covariance, problem.dim, psd=True)
    if pre is not None:
        p = pre.numpy()
        C = p[:, None] * C * p[None, :]
    return torch.as_tensor(psd_sqrt(lr * C / batch_size), dtype=dtype)


def simulate_langevin(  # noqa: C901
    problem: Problem,
    lr: float,
    time: float,
    dt: float,
    chains: int = 1000,
    *,
    batch_size: int = 1,
    init: Any = None,
    preconditioner: Any = None,
    diffusion: str = "constant",
    covariance: Any = None,
    burn_in_time: float = 0.0,
    record_every: int | None = None,
    statistics: bool = True,
    observables: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    dtype: Any = None,
) -> ChainResult:
    """Euler-Maruyama for ``d Phi = -P g dt + sqrt(eta P Sigma P / B) dW`` over R chains.

    Args:
        problem: a :class:`~sgdlab.dynamics.Problem` (``grad`` and the noise covariance are used).
        lr: eta, the SGD learning rate the SDE models (sets the temperature).
        time, dt: horizon and Euler-Maruyama step (``time/dt`` steps).
        chains: R.  batch_size : B.
        init: start (vector or ``(R, d)``; default the optimum, else 0).
        preconditioner: None, "inverse_std", "inverse_variance" or a positive vector ``P``.
        diffusion: "constant" (``Sigma = C``, or ``covariance``) or "state" (``Sigma(Phi)`` from
            ``problem.gradient_covariance``; e.g. least squares' multiplicative noise).
        burn_in_time: leading time excluded from the averages.
        record_every, statistics, observables, seed, generator, dtype: as :func:`simulate_sgd`.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an sgdlab.dynamics Problem, got {type(problem).__name__}")
    dtype = resolve_dtype(dtype)
    eta = check_positive("lr", lr)
    time, dt = check_positive("time", time), check_positive("dt", dt)
    steps = _steps(time, dt)
    R = check_count("chains", chains)
    B = check_batch_size("batch_size", batch_size)
    check_choice("diffusion", diffusion, ("constant", "state"))
    if not 0.0 <= burn_in_time < time:
        raise ValueError(f"burn_in_time must satisfy 0 <= burn_in_time < time, got {burn_in_time}")
    burn_in = int(round(burn_in_time / dt))
    if record_every is not None:
        record_every = check_count("record_every", record_every)
    gen = make_generator(seed, generator)
    d = problem.dim
    pre = resolve_fixed_preconditioner(preconditioner, problem, dtype)
    center = torch.as_tensor(
        problem.optimum if problem.optimum is not None else np.zeros(d), dtype=dtype
    )
    phi = check_init(center if init is None else init, R, d, dtype)
    sqdt = dt**0.5
    if diffusion == "constant":
        Lt = (_diffusion_factor(problem, eta, B, pre, covariance, dtype) * sqdt).T.contiguous()
    elif not hasattr(problem, "gradient_covariance"):
        raise ValueError(f"diffusion='state' needs {type(problem).__name__}.gradient_covariance")
    drift_scale = dt if pre is None else dt * pre
    # affine gradient g = Phi M + c (quadratics): one step is Phi A + (noise - dt P c) with
    # A = I - dt M diag(P); the constant is folded into each block of noise
    affine = problem.affine_gradient(dtype) if diffusion == "constant" else None
    if affine is not None:
        M, c = affine
        A = torch.eye(d, dtype=dtype) - M * drift_scale
        A_diag = diagonal_or_none(A)
        if A_diag is not None:
            A_diag = expand_full(A_diag, (R, d))
    transform = None
    if diffusion == "constant":
        transform = scale_transform(Lt, None if affine is None else -(affine[1] * drift_scale))
    noise = NormalBlocks(gen, (R, d), steps, dtype, transform)

    acc = _Accumulator(problem, center, observables, with_grad=False) if statistics else None
    rec_steps, traj = [], []
    for k in range(steps):
        if record_every is not None and k % record_every == 0:
            rec_steps.append(k)
            traj.append(phi.clone())
        if acc is not None and k >= burn_in:
            acc.add(phi, None)
        z = noise(k)
        if affine is not None:
            phi = torch.addcmul(z, phi, A_diag) if A_diag is not None else torch.addmm(z, phi, A)
        elif diffusion == "constant":
            phi = phi - drift_scale * problem.grad(phi) + z
        else:
            g = problem.grad(phi)
            Sig = problem.gradient_covariance(phi)
            if pre is not None:
                Sig = pre[:, None] * Sig * pre[None, :]
            w, v = torch.linalg.eigh(Sig * (eta / B))
            L = v * w.clamp_min(0).sqrt().unsqueeze(-2)
            phi = phi - drift_scale * g + sqdt * (L @ z.unsqueeze(-1)).squeeze(-1)
        if k % 256 == 255 or k == steps - 1:
            finite_or_raise("the Langevin state", phi, k)

    result = ChainResult(final=phi, steps=steps, burn_in=burn_in, center=center)
    if record_every is not None:
        rec_steps.append(steps)
        traj.append(phi.clone())
        result.trajectory = torch.stack(traj)
        result.record_steps = torch.tensor(rec_steps)
        result.times = result.record_steps.to(dtype) * dt
    if acc is not None:
        acc.fill(result)
    return result


def first_passage_times(
    problem: Problem,
    lr: float,
    target: float,
    dt: float,
    max_time: float,
    chains: int = 1000,
    *,
    batch_size: int = 1,
    init: Any = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    dtype: Any = None,
) -> torch.Tensor:
    """First times a 1-D Langevin chain reaches ``target`` (from the side it starts on).

    Simulates ``dX = -g dt + sqrt(eta sigma^2 / B) dW`` (temperature ``eta sigma^2/(2B)``) by
    Euler-Maruyama until every chain has crossed or ``max_time``; returns an ``(R,)`` tensor of
    hitting times with ``inf`` for chains that did not cross. Crossings are detected at the
    grid times, which biases the times up by O(sqrt(dt)) near the target.
    """
    if problem.dim != 1:
        raise ValueError(f"first_passage_times needs a 1-D problem, got dim={problem.dim}")
    dtype = resolve_dtype(dtype)
    eta, dt = check_positive("lr", lr), check_positive("dt", dt)
    max_time = check_positive("max_time", max_time)
    R = check_count("chains", chains)
    B = check_batch_size("batch_size", batch_size)
    gen = make_generator(seed, generator)
    x = check_init(problem.optimum if init is None else init, R, 1, dtype)[:, 0]
    b = float(target)
    sign = torch.where(x < b, 1.0, -1.0).to(dtype)
    if bool((x == b).any()):
        raise ValueError(f"init must differ from target={b}")
    scale = float(_diffusion_factor(problem, eta, B, None, None, dtype)[0, 0]) * dt**0.5
    hit = torch.full((R,), float("inf"), dtype=dtype)
    alive = torch.ones(R, dtype=torch.bool)
    steps = int(np.ceil(max_time / dt))
    noise = NormalBlocks(gen, (R,), steps, dtype, lambda z: z.mul_(scale))
    for k in range(steps):
        x = x - dt * problem.grad(x.unsqueeze(-1))[:, 0] + noise(k)
        crossed = alive & (sign * (x - b) >= 0)
        if bool(crossed.any()):
            hit[crossed] = (k + 1) * dt
            alive &= ~crossed
            if not bool(alive.any()):
                break
        if k % 256 == 255:
            finite_or_raise("the Langevin state", x, k)
    return hit
