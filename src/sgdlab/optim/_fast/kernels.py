r"""Fused update rules on flat buffers: pure functions of flat tensors and one scalar vector.

Each kernel applies one optimizer step to a single flat parameter buffer (and its flat state
buffers) with the arithmetic of the per-tensor reference of :mod:`sgdlab.optim` (same
operations, same order, so the two agree to rounding in float64). Every value that changes from
step to step (learning rate, momentum, the average weights, the bias corrections) enters
through ``sc``, a 1-D tensor of the state dtype on the buffers' device, so a new value never
recompiles; only the structural options (``maximize``, whether weight decay is on, ``amsgrad``,
``power``'s form, ...) select a variant.

Mixed precision: with a ``master`` buffer (float32 copy of bfloat16/float16 parameters) the
step is computed in the master's dtype from the upcast gradient, written to the master, and the
parameter receives the master rounded to its own dtype. Without one, parameters of the state
dtype are updated in place.

:func:`get_kernel` compiles a variant once with ``torch.compile`` (inductor: C++ on CPU, Triton
on CUDA) and caches it at module level; each variant gets its own code object, so dynamo's
per-code recompile limit is never shared between variants, and ``dynamic=True`` lets one
compiled kernel serve buffers of every length.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "SGD_SCALARS",
    "RMSPROP_SCALARS",
    "ADAM_SCALARS",
    "make_kernel",
    "get_kernel",
    "pack_scalars",
]

# Layout of the scalar vector ``sc`` of each algorithm.
SGD_SCALARS = ("wd", "momentum", "one_minus_dampening", "neg_lr")
RMSPROP_SCALARS = ("wd", "alpha", "one_minus_alpha", "eps", "power", "momentum", "neg_lr",
                   "two_sign_wd", "wd2")
ADAM_SCALARS = ("wd", "decay", "w1", "d2", "w2", "c2", "sqrt_c2", "eps", "power", "step_size",
                "two_sign_wd", "wd2", "eps_sqrt_c2", "step_size_sqrt_c2")

_LAYOUTS = {"sgd": SGD_SCALARS, "rmsprop": RMSPROP_SCALARS, "adam": ADAM_SCALARS}


def pack_scalars(algo: str, values: dict[str, float], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """The scalar vector of ``algo`` (missing names are 0) as a tensor on ``device``."""
    layout = _LAYOUTS[algo]
    return torch.tensor([float(values.get(k, 0.0)) for k in layout], dtype=dtype).to(device)


def _index(algo: str) -> dict[str, int]:
    return {k: i for i, k in enumerate(_LAYOUTS[algo])}


def _denominator(s: torch.Tensor, sc: torch.Tensor, ix: dict[str, int], *, power: str,
                 placement: str, corrected: bool) -> torch.Tensor:
    """``sgdlab.optim._moments.denominator`` on a flat buffer; ``power`` is ``"half"``,
    ``"one"`` or ``"general"`` (read from ``sc``), ``corrected`` divides by Adam's ``c2``."""
    eps = sc[ix["eps"]]
    if power == "half" and placement == "outside":
        d = s.sqrt()
        if corrected:
            d = d / sc[ix["sqrt_c2"]]
        return d + eps
    shat = s / sc[ix["c2"]] if corrected else s
    if placement == "inside":
        shat = shat + eps
        if power == "half":
            return shat.sqrt()
        return shat if power == "one" else shat.pow(sc[ix["power"]])
    if power == "general":
        shat = shat.pow(sc[ix["power"]])
    return shat + eps


def _per_example(m2: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, sc: torch.Tensor,
                 ix: dict[str, int], weight_decay: bool) -> torch.Tensor:
    """``mean_b (s g_b + wd p)^2`` from ``m2 = mean_b g_b^2`` (``_moments.per_example_second_
    moment``): ``m2 + 2 s wd p g + wd^2 p^2`` with the raw gradient ``g``."""
    if not weight_decay:
        return m2
    return m2 + sc[ix["two_sign_wd"]] * x * grad + sc[ix["wd2"]] * x * x


def _write_param(p: torch.Tensor, master: torch.Tensor | None, x: torch.Tensor) -> None:
    if master is not None:
        master.copy_(x)
        p.copy_(x.to(p.dtype))
    else:
        p.copy_(x)


def make_kernel(algo: str, opts: tuple[tuple[str, Any], ...]) -> Callable[..., None]:
    """The plain (uncompiled) kernel of ``algo`` for the structural options ``opts``.

    Signatures (``None`` for absent buffers):

    * sgd: ``(p, g, buf, master, sc)``
    * rmsprop: ``(p, g, square_avg, grad_avg, buf, m2, master, sc)``
    * adam: ``(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, m2, master, sc)``
    """
    o = dict(opts)
    ix = _index(algo)

    if algo == "sgd":
        def sgd(p, g, buf, master, sc):
            x = master if master is not None else p
            d = g.to(x.dtype)
            if o["maximize"]:
                d = -d
            if o["weight_decay"]:
                d = d + sc[ix["wd"]] * x
            if o["momentum"]:
                if o["init_buffer"]:
                    b = d
                else:
                    b = buf * sc[ix["momentum"]] + sc[ix["one_minus_dampening"]] * d
                buf.copy_(b)
                d = d + sc[ix["momentum"]] * b if o["nesterov"] else b
            _write_param(p, master, x + sc[ix["neg_lr"]] * d)

        fn = sgd
    elif algo == "rmsprop":
        def rmsprop(p, g, square_avg, grad_avg, buf, m2, master, sc):
            x = master if master is not None else p
            raw = g.to(x.dtype)
            d = -raw if o["maximize"] else raw
            if o["weight_decay"]:
                d = d + sc[ix["wd"]] * x
            if m2 is not None:
                q = _per_example(m2, x, raw, sc, ix, o["weight_decay"])
                s = square_avg * sc[ix["alpha"]] + sc[ix["one_minus_alpha"]] * q
            else:
                s = square_avg * sc[ix["alpha"]] + sc[ix["one_minus_alpha"]] * d * d
            square_avg.copy_(s)
            if o["centered"]:
                ga = torch.lerp(grad_avg, d, sc[ix["one_minus_alpha"]])
                grad_avg.copy_(ga)
                s = s - ga * ga
            avg = _denominator(s, sc, ix, power=o["power"], placement=o["eps_placement"],
                               corrected=False)
            if o["momentum"]:
                b = buf * sc[ix["momentum"]] + d / avg
                buf.copy_(b)
                x = x + sc[ix["neg_lr"]] * b
            else:
                x = x + sc[ix["neg_lr"]] * (d / avg)
            _write_param(p, master, x)

        fn = rmsprop
    elif algo == "adam":
        def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, m2, master, sc):
            x = master if master is not None else p
            raw = g.to(x.dtype)
            d = -raw if o["maximize"] else raw
            q = None
            if m2 is not None:
                # AdamW's decay is not part of the gradient: no decay terms in q.
                q = _per_example(m2, x, raw, sc, ix, o["weight_decay"] and not o["decoupled"])
            if o["weight_decay"]:
                if o["decoupled"]:
                    x = x * sc[ix["decay"]]
                else:
                    d = d + sc[ix["wd"]] * x
            m = torch.lerp(exp_avg, d, sc[ix["w1"]])
            exp_avg.copy_(m)
            if q is None:
                v = exp_avg_sq * sc[ix["d2"]] + sc[ix["w2"]] * d * d
            else:
                v = exp_avg_sq * sc[ix["d2"]] + sc[ix["w2"]] * q
            exp_avg_sq.copy_(v)
            if o["amsgrad"]:
                v = torch.maximum(max_exp_avg_sq, v)
                max_exp_avg_sq.copy_(v)
            if o["power"] == "half" and o["eps_placement"] == "outside":
                # lr/c1 * m / (sqrt(v)/sqrt(c2) + eps) with one division per element:
                # (lr sqrt(c2)/c1) * m / (sqrt(v) + eps sqrt(c2)); equal up to rounding.
                denom = v.sqrt() + sc[ix["eps_sqrt_c2"]]
                step = sc[ix["step_size_sqrt_c2"]]
            else:
                denom = _denominator(v, sc, ix, power=o["power"],
                                     placement=o["eps_placement"], corrected=o["corrected"])
                step = sc[ix["step_size"]]
            _write_param(p, master, x + step * (m / denom))

        fn = adam
    else:
        raise ValueError(f"algo must be 'sgd', 'rmsprop' or 'adam', got {algo!r}")
    if o.get("capturable"):
        return _capturable(algo, o, ix, fn)
    return fn


def _capturable(algo: str, o: dict[str, Any], ix: dict[str, int],
                fn: Callable[..., None]) -> Callable[..., None]:
    """The step of ``fn`` with its per-step scalars computed on the device (CUDA-graph safe).

    Extra arguments (RMSProp, Adam): ``steps`` (the parameters' step counts, advanced by one),
    and for Adam
    ``counters`` = (beta1 product, beta2 product, lecture count 1, lecture count 2) and ``hp`` =
    (lr, beta1, beta2, N1, N2, eps), both float64. The bias corrections advance exactly as on the
    host path (:func:`sgdlab.optim.adam.adam_scalars`: products of the betas in force at each
    step, the lecture's n_t = min(N_t, n_{t-1} + 1)), in float64, and enter the same update
    through a scalar vector rebuilt in the kernel.
    """
    if algo == "sgd":
        return fn  # no per-step scalars: only the scalar vector must stay put (host side)
    if algo == "rmsprop":
        def rmsprop_cap(p, g, square_avg, grad_avg, buf, m2, master, sc, steps):
            steps.copy_(steps + 1)
            fn(p, g, square_avg, grad_avg, buf, m2, master, sc)

        return rmsprop_cap
    correction = o["correction"]

    def adam_cap(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, m2, master, sc, steps, counters, hp):
        steps.copy_(steps + 1)
        lr, b1, b2 = hp[0], hp[1], hp[2]
        one = torch.ones_like(lr)
        if correction == "published":
            p1, p2 = counters[0] * b1, counters[1] * b2
            counters.copy_(torch.stack([p1, p2, counters[2], counters[3]]))
            w1, d2, w2, c1, c2 = 1.0 - b1, b2, 1.0 - b2, 1.0 - p1, 1.0 - p2
        elif correction == "lecture":
            n1 = torch.minimum(hp[3], counters[2] + 1.0)
            n2 = torch.minimum(hp[4], counters[3] + 1.0)
            counters.copy_(torch.stack([counters[0], counters[1], n1, n2]))
            w1, d2, w2, c1, c2 = 1.0 / n1, 1.0 - 1.0 / n2, 1.0 / n2, one, one
        else:
            w1, d2, w2, c1, c2 = 1.0 - b1, b2, 1.0 - b2, one, one
        eps = hp[5]
        sqrt_c2 = c2.sqrt()
        computed = {"w1": w1, "d2": d2, "w2": w2, "c2": c2, "sqrt_c2": sqrt_c2,
                    "step_size": -(lr / c1), "eps_sqrt_c2": eps * sqrt_c2,
                    "step_size_sqrt_c2": -(lr / c1) * sqrt_c2}
        full = torch.stack([computed[k].to(sc.dtype) if k in computed else sc[i]
                            for k, i in ix.items()])
        fn(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, m2, master, full)

    return adam_cap


def _own_code(fn: Callable[..., None], name: str) -> Callable[..., None]:
    """A copy of ``fn`` with its own code object (dynamo's caches and recompile limits are per
    code object, so each variant gets its own)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@functools.cache
def get_kernel(algo: str, opts: tuple[tuple[str, Any], ...], compiled: bool) -> Callable[..., None]:
    """The kernel of ``algo``/``opts``: ``torch.compile``-d (cached for the process; inductor
    also keeps its generated code on disk between processes) or the plain function."""
    fn = make_kernel(algo, opts)
    if not compiled:
        return fn
    tag = "_".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in opts)
    fn = _own_code(fn, f"sgdlab_{algo}_{tag}")
    return torch.compile(fn, dynamic=True, fullgraph=True)
