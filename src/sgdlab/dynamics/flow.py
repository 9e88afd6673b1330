"""Gradient flow ``d Phi/dt = -g(Phi)`` and the error of (stochastic) gradient descent against it.

* Quadratic losses (``problem.hessian`` exact everywhere: :class:`Quadratic`,
  :class:`GaussianLeastSquares`, :class:`MeanEstimation`): the exact solution
  ``Phi(t) = Phi* + expm(-H t)(Phi_0 - Phi*)``; otherwise scipy's ``solve_ivp`` (DOP853, tight
  tolerances) on all chains at once.
* ``modified_lr = eta`` integrates the modified flow ``-grad(L + (eta/4) ||grad L||^2)
  = -(g + (eta/2) H g)`` (backward error analysis; Barrett & Dherin 2021, "Implicit gradient
  regularization"): gradient descent with step eta follows it to second order.

Gradient descent with step eta has first-order (O(eta)) error against the flow at
``t = sum of learning rates``; on a quadratic the ratio of GD to flow per mode is
``(1 - eta h)^k / exp(-eta h k) = exp(-eta h^2 t / 2 + O(eta^2))``. SGD has weak error O(eta)
and RMS (strong) error O(sqrt(eta)) (:func:`flow_errors`, :func:`convergence_order`).

Example::

    >>> from sgdlab.dynamics import Quadratic, flow_errors, convergence_order
    >>> p = Quadratic(hessian=[1.0, 0.5], noise_covariance=[1.0, 1.0])
    >>> errs = flow_errors(p, [0.1, 0.05, 0.025], time=2.0, init=[1.0, 1.0], stochastic=False)
    >>> round(convergence_order([0.1, 0.05, 0.025], errs["rms_error"]), 1)
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .._validation import check_batch_size, check_nonnegative, check_positive
from ._common import check_init, resolve_dtype
from .problems.base import Problem
from .problems.least_squares import GaussianLeastSquares
from .problems.mean_estimation import MeanEstimation
from .problems.quadratic import Quadratic
from .sgd import simulate_sgd

__all__ = ["convergence_order", "flow_errors", "gradient_flow"]

_QUADRATIC = (Quadratic, GaussianLeastSquares, MeanEstimation)


def gradient_flow(
    problem: Problem,
    init: Any,
    times: Sequence[float],
    *,
    modified_lr: float | None = None,
    rtol: float = 1e-11,
    atol: float = 1e-13,
    method: str = "auto",
    dtype: Any = None,
) -> torch.Tensor:
    """The flow ``Phi(t)`` at ``times`` from ``init`` (a vector or ``(R, d)``): ``(K, R, d)``.

    ``method``: "auto" (exact for quadratics, else "ivp"), "exact" or "ivp".
    """
    dtype = resolve_dtype(dtype)
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if t.size == 0 or not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError(f"times must be finite and >= 0, got {times!r}")
    x0 = torch.as_tensor(init, dtype=dtype)
    R = 1 if x0.ndim <= 1 else x0.shape[0]
    phi0 = check_init(x0, R, problem.dim, dtype)
    eta = 0.0 if modified_lr is None else check_nonnegative("modified_lr", modified_lr)
    if method not in ("auto", "exact", "ivp"):
        raise ValueError(f"method must be one of 'auto', 'exact', 'ivp'; got {method!r}")
    if method == "exact" and not isinstance(problem, _QUADRATIC):
        raise ValueError(f"method='exact' needs a quadratic problem, got {type(problem).__name__}")
    if method != "ivp" and isinstance(problem, _QUADRATIC):
        H = torch.as_tensor(problem.hessian, dtype=dtype)
        G = H + 0.5 * eta * (H @ H)  # grad of L + eta/4 |H e|^2 is (H + eta/2 H^2) e
        opt = torch.as_tensor(problem.optimum, dtype=dtype)
        e0 = phi0 - opt
        out = [opt + e0 @ torch.linalg.matrix_exp(-G * float(tk)).T for tk in t]
        return torch.stack(out)
    from scipy.integrate import solve_ivp

    d = problem.dim

    def rhs(_t: float, y: np.ndarray) -> np.ndarray:
        phi = torch.as_tensor(y.reshape(R, d), dtype=torch.float64)
        g = problem.grad(phi)
        if eta:
            g = g + 0.5 * eta * problem.hessian_vector_product(phi, g)
        return (-g).numpy().reshape(-1)

    start = phi0.to(torch.float64).numpy().reshape(-1)
    # solve_ivp wants strictly increasing times and a span of positive length: solve at the
    # distinct times, then hand each requested time its value (times may repeat or be all 0)
    uniq, back = np.unique(t, return_inverse=True)
    if uniq[-1] == 0.0:
        y = np.broadcast_to(start, (uniq.size, start.size))
    else:
        sol = solve_ivp(
            rhs, (0.0, float(uniq[-1])), start, method="DOP853", t_eval=uniq, rtol=rtol, atol=atol
        )
        if not sol.success:
            raise RuntimeError(f"solve_ivp failed: {sol.message}")
        y = sol.y.T
    return torch.as_tensor(np.ascontiguousarray(y[back]).reshape(t.size, R, d), dtype=dtype)


def flow_errors(
    problem: Problem,
    lrs: Sequence[float],
    time: float,
    init: Any,
    *,
    stochastic: bool = True,
    batch_size: int = 1,
    chains: int = 1000,
    observable: Callable[[torch.Tensor], torch.Tensor] | None = None,
    modified: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Errors of constant-lr (S)GD against the flow at ``t = K eta = time`` for each eta.

    Returns arrays over ``lrs``: ``rms_error = sqrt(E ||Phi_K - Phi(t)||^2)`` (strong error),
    ``weak_error = |E f(Phi_K) - f(Phi(t))|`` with ``f = observable`` (default: the loss), and
    their standard errors across chains (``rms_stderr``, ``weak_stderr``; 0 when
    deterministic). ``stochastic=False`` runs full-batch gradient descent (one chain).
    ``modified=True`` compares with the modified flow at each eta.
    """
    time = check_positive("time", time)
    B = check_batch_size("batch_size", batch_size)
    f = observable if observable is not None else problem.loss
    rows = {k: [] for k in ("rms_error", "rms_stderr", "weak_error", "weak_stderr", "steps")}
    # full-batch GD is deterministic: one chain per starting point given
    init_t = torch.as_tensor(init)
    starts = init_t.reshape(-1, init_t.shape[-1]).shape[0] if init_t.dim() > 1 else 1
    for i, eta in enumerate(lrs):
        eta = check_positive(f"lrs[{i}]", eta)
        K = int(round(time / eta))
        if abs(K * eta - time) > 1e-9 * time:
            raise ValueError(f"time / lr must be an integer, got time={time}, lr={eta}")
        R = chains if stochastic else starts
        run = simulate_sgd(
            problem,
            eta,
            B,
            K,
            R,
            init=init,
            statistics=False,
            seed=seed + i,
            sampling="replacement" if stochastic else "full",
        )
        ref = gradient_flow(problem, init, [K * eta], modified_lr=eta if modified else None)[0]
        diff2 = ((run.final - ref) ** 2).sum(-1)
        fk = torch.as_tensor(f(run.final), dtype=torch.float64).reshape(R, -1).sum(-1)
        # the flow from each chain's starting point (all alike unless init gives one per chain)
        rows_ref = ref.reshape(-1, ref.shape[-1])
        fref = float(
            torch.as_tensor(f(rows_ref), dtype=torch.float64)
            .reshape(rows_ref.shape[0], -1)
            .sum(-1)
            .mean()
        )
        ms = float(diff2.mean())
        ms_se = float(diff2.std() / R**0.5) if R > 1 else 0.0
        rows["rms_error"].append(ms**0.5)
        rows["rms_stderr"].append(0.5 * ms_se / ms**0.5 if ms > 0 else 0.0)
        rows["weak_error"].append(abs(float(fk.mean()) - fref))
        rows["weak_stderr"].append(float(fk.std() / R**0.5) if R > 1 else 0.0)
        rows["steps"].append(K)
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}


def convergence_order(step_sizes: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(step size)``: the measured order."""
    h = np.asarray(step_sizes, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    if h.shape != e.shape or h.size < 2 or np.any(h <= 0) or np.any(e <= 0):
        raise ValueError("need >= 2 positive step sizes and positive errors of the same length")
    return float(np.polyfit(np.log(h), np.log(e), 1)[0])
