"""Vectorised SGD over R independent chains: batch size B with replacement or by reshuffled
epochs, lecture-form momentum, per-coordinate preconditioning, learning-rate schedules.

Update (lecture notation, mean-reduced batch gradient ``g_hat``):

* plain: ``Phi_{t+1} = Phi_t - eta_t P g_hat_t``;
* momentum with horizon ``N_g``: ``mu_t = (1 - 1/N_g) mu_{t-1} + (1/N_g) g_hat_t``,
  ``Phi_{t+1} = Phi_t - N_g eta_t P mu_t`` -- identical to heavy ball
  ``v_t = beta v_{t-1} + eta g_hat_t``, ``Phi -= v_t`` with ``beta = 1 - 1/N_g`` for constant
  ``eta``, and to ``torch.optim.SGD(lr=eta, momentum=beta)``;
* ``P`` = identity, a fixed per-coordinate vector, or RMSProp's running estimate.

Sampling: "replacement" draws B indices uniformly per step (``torch.randint``), or fresh
examples for population problems; "reshuffle" draws a permutation per chain per epoch (argsort
of uniform noise) and walks through it in ``n // B`` batches (an incomplete last batch is
dropped); "full" uses the full gradient (deterministic gradient descent). The lecture's
claims about stationary laws assume sampling with replacement.

Implementation: for additive Gaussian noise (``problem.additive_noise_sqrt()``) the batch noise
is drawn in cache-sized blocks, and for affine gradients (quadratics) ``g_hat`` is one fused
``addmm``; other problems draw per-example gradients through the problem each step.

Example::

    >>> from sgdlab.dynamics import Quadratic, simulate_sgd, estimate_mean
    >>> p = Quadratic(hessian=1.0, noise_covariance=1.0)
    >>> r = simulate_sgd(p, lr=0.5, batch_size=1, steps=2000, chains=500, seed=0)
    >>> m, se = estimate_mean(r.excess_loss)   # exact: 1/6
    >>> abs(m - 1/6) < 4 * se
    True
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._validation import check_batch_size, check_choice, check_count, check_horizon
from ._common import (
    LearningRate,
    NormalBlocks,
    check_init,
    diagonal_or_none,
    expand_full,
    finite_or_raise,
    make_generator,
    resolve_dtype,
    resolve_lr,
    scale_transform,
)
from .preconditioning import RMSPropPreconditioner, resolve_fixed_preconditioner
from .problems.base import Problem
from .result import ChainResult, _Accumulator

__all__ = ["simulate_sgd"]


def simulate_sgd(  # noqa: C901
    problem: Problem,
    lr: LearningRate,
    batch_size: int = 1,
    steps: int = 1000,
    chains: int = 1000,
    *,
    init: Any = None,
    sampling: str = "replacement",
    momentum_horizon: float = 1.0,
    init_momentum: Any = None,
    preconditioner: Any = None,
    burn_in: int = 0,
    record_every: int | None = None,
    statistics: bool = True,
    observables: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    dtype: Any = None,
) -> ChainResult:
    """Run ``chains`` independent SGD chains for ``steps`` steps on ``problem``.

    Args:
        problem: a :class:`~sgdlab.dynamics.Problem`.
        lr: per-step learning rate ``eta`` (float) or a schedule ``t -> eta_t``.
        batch_size: B (mean reduction over the batch).
        steps, chains: run length and number of independent chains R.
        init: start, a length-d vector or an ``(R, d)`` array (default: the optimum, else 0).
            To start at a stationary law pass samples from it.
        sampling: "replacement" (default), "reshuffle" (finite data sets only) or "full"
            (gradient descent with the full gradient).
        momentum_horizon: ``N_g >= 1`` (1 = no momentum); ``beta = 1 - 1/N_g``.
        init_momentum: initial ``mu`` (default 0, as in the lecture).
        preconditioner: None, "inverse_std", "inverse_variance", a positive length-d vector,
            or an :class:`RMSPropPreconditioner`.
        burn_in: leading steps excluded from the time averages.
        record_every: keep ``Phi_t`` every this many steps (and the last) in ``trajectory``.
        statistics: collect time averages (set False for pure speed).
        observables: extra functions of the state to time-average, by name.
        seed / generator : randomness (a fixed seed gives identical runs).
        dtype: torch dtype (float64 default).

    Returns:
        :class:`~sgdlab.dynamics.ChainResult`.
    """
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be an sgdlab.dynamics Problem, got {type(problem).__name__}")
    dtype = resolve_dtype(dtype)
    schedule = resolve_lr(lr)
    B = check_batch_size("batch_size", batch_size)
    steps = check_count("steps", steps)
    R = check_count("chains", chains)
    check_choice("sampling", sampling, ("replacement", "reshuffle", "full"))
    Ng = check_horizon("momentum_horizon", momentum_horizon)
    if isinstance(burn_in, numbers.Integral) and not isinstance(burn_in, bool):
        burn_in = int(burn_in)
    if not isinstance(burn_in, int) or isinstance(burn_in, bool) or not 0 <= burn_in < steps:
        raise ValueError(
            f"burn_in must be an integer with 0 <= burn_in < steps={steps}, got {burn_in!r}"
        )
    if record_every is not None:
        record_every = check_count("record_every", record_every)
    gen = make_generator(seed, generator)
    d = problem.dim

    if sampling == "reshuffle":
        if problem.n is None:
            raise ValueError(
                "sampling='reshuffle' needs a finite data set; "
                f"{type(problem).__name__} samples a population (n is None)"
            )
        if B > problem.n:
            raise ValueError(f"batch_size must be <= n={problem.n} with reshuffling, got {B}")
    rms = preconditioner if isinstance(preconditioner, RMSPropPreconditioner) else None
    fixed = (
        None if rms is not None else resolve_fixed_preconditioner(preconditioner, problem, dtype)
    )
    per_example_q = rms is not None and rms.second_moment == "per_example"
    if per_example_q and sampling == "full":
        raise ValueError(
            "a per_example second moment needs per-example gradients; sampling='full' has none"
        )

    center = torch.as_tensor(
        problem.optimum if problem.optimum is not None else torch.zeros(d), dtype=dtype
    )
    phi = check_init(center if init is None else init, R, d, dtype)
    mu = None
    if init_momentum is not None and Ng == 1.0:
        raise ValueError(
            "init_momentum needs momentum_horizon > 1 (with momentum_horizon=1 "
            "there is no momentum state)"
        )
    if Ng > 1.0:
        mu = (
            torch.zeros(R, d, dtype=dtype)
            if init_momentum is None
            else check_init(init_momentum, R, d, dtype)
        )
    s = torch.zeros(R, d, dtype=dtype) if rms is not None else None

    # additive Gaussian noise: draw it in blocks; affine gradient: g_hat = Phi M + (c + xi)
    K = (
        problem.additive_noise_sqrt(dtype)
        if sampling == "replacement" and not per_example_q
        else None
    )
    affine = problem.affine_gradient(dtype) if K is not None else None
    block = None
    M_full = None
    if affine is not None:
        M_diag = diagonal_or_none(affine[0])
        M_full = None if M_diag is None else expand_full(M_diag, (R, d))
    if K is not None:
        block = NormalBlocks(
            gen,
            (R, d),
            steps,
            dtype,
            scale_transform(K / B**0.5, None if affine is None else affine[1]),
        )

    acc = _Accumulator(problem, center, observables, with_grad=True) if statistics else None
    rec_steps: list[int] = []
    traj: list[torch.Tensor] = []
    times: list[float] = []
    elapsed = 0.0
    epoch_len = problem.n // B if sampling == "reshuffle" else 0
    perm = None

    for t in range(steps):
        if record_every is not None and t % record_every == 0:
            rec_steps.append(t)
            traj.append(phi.clone())
            times.append(elapsed)
        eta = schedule(t)
        # -- the batch gradient ------------------------------------------------------------
        if sampling == "reshuffle":
            j = t % epoch_len
            if j == 0:
                perm = torch.argsort(torch.rand(R, problem.n, generator=gen, dtype=dtype), dim=1)
            idx = perm[:, j * B : (j + 1) * B]
            per_ex = problem.example_grads(phi, idx)
            g_hat = per_ex.mean(dim=1)
        elif per_example_q:
            per_ex = problem.sample_example_grads(phi, B, gen)
            g_hat = per_ex.mean(dim=1)
        elif sampling == "full":
            per_ex = None
            g_hat = problem.grad(phi)
        elif block is not None:
            per_ex = None
            if M_full is not None:
                g_hat = torch.addcmul(block(t), phi, M_full)
            elif affine is not None:
                g_hat = torch.addmm(block(t), phi, affine[0])
            else:
                g_hat = problem.grad(phi) + block(t)
        else:
            per_ex = None
            g_hat = problem.sample_grad(phi, B, gen)
        if acc is not None and t >= burn_in:
            acc.add(phi, g_hat)
        # -- the update ---------------------------------------------------------------------
        if mu is not None:
            mu.mul_(1.0 - 1.0 / Ng).add_(g_hat, alpha=1.0 / Ng)
            direction = mu
            scale = Ng * eta
        else:
            direction = g_hat
            scale = eta
        if rms is not None:
            q = (per_ex * per_ex).mean(dim=1) if per_example_q else g_hat * g_hat
            w = 1.0 / min(t + 1, rms.horizon)
            s.mul_(1.0 - w).add_(q, alpha=w)
            direction = direction * rms.weight(s)
        elif fixed is not None:
            direction = direction * fixed
        phi = torch.add(phi, direction, alpha=-scale)
        elapsed += eta
        if t % 256 == 255 or t == steps - 1:
            finite_or_raise("the SGD iterate", phi, t)

    result = ChainResult(final=phi, steps=steps, burn_in=burn_in, center=center, momentum=mu)
    if record_every is not None:
        rec_steps.append(steps)
        traj.append(phi.clone())
        times.append(elapsed)
        result.trajectory = torch.stack(traj)
        result.record_steps = torch.tensor(rec_steps)
        result.times = torch.tensor(times, dtype=dtype)
    if acc is not None:
        acc.fill(result)
    return result
