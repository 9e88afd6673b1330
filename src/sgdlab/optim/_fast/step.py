"""The fused step of SGD, RMSProp and Adam: flat buffers per (param group, device, dtype), one
kernel launch each, with the host-side bookkeeping (step counts, Adam's debiasing products)
that keeps ``optimizer.state`` identical to the reference path's.

:func:`fused_update` either performs the whole step of a param group and returns ``True``, or
changes no value and returns ``False`` (the caller then takes the foreach/reference path on the
same views). It declines when a parameter is not contiguous or not floating point, a gradient
is sparse, SGD momentum buffers exist for some parameters only, or Adam's step counts differ
between parameters (after a parameter missed steps): a rule with per-parameter scalars.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch

from sgdlab.optim._base import group_indices, scalar_dtype
from sgdlab.optim._fast import _config
from sgdlab.optim._fast.flat import FlatGroup
from sgdlab.optim._fast.kernels import get_kernel, pack_scalars

__all__ = ["fused_update", "forget", "run_kernel", "grads_all_finite", "sync_host_state"]

_ADAM_HOST_KEYS = ("beta1_prod", "beta2_prod", "lecture_count1", "lecture_count2")


def forget(opt: Any, group: dict | None = None) -> None:
    """Drop the flat-buffer bookkeeping of ``group`` (all groups when ``None``); the next fused
    step rebuilds it from the parameters and state as they are then."""
    cache = opt.__dict__.get("_fast_cache")
    if not cache:
        return
    sync_host_state(opt)
    if group is None:
        cache.clear()
    else:
        cache.pop(id(group), None)


def sync_host_state(opt: Any) -> None:
    """Write the device-side Adam counters of capturable groups (debiasing products, lecture
    counts) into ``optimizer.state`` (one host sync per flat group; called before
    ``state_dict`` and before a group leaves the fused path). Step counts need no copy: the
    state's ``step`` entries are views of the device tensor the kernel advances."""
    cache = opt.__dict__.get("_fast_cache")
    if not cache:
        return
    for entry in cache.values():
        _sync_fgs(entry.fgs)


def _sync_fgs(fgs: list[FlatGroup]) -> None:
    for fg in fgs:
        counters = getattr(fg, "counters", None)
        if counters is None:
            continue
        p1, p2, n1, n2 = counters.tolist()
        for st in fg.state_dicts:
            if fg.correction == "published":
                st["beta1_prod"], st["beta2_prod"] = p1, p2
            elif fg.correction == "lecture":
                st["lecture_count1"], st["lecture_count2"] = n1, n2


def _cached(fg: FlatGroup, name: str, values: tuple, make: Any) -> torch.Tensor:
    """A device tensor rebuilt only when ``values`` change: a capturable step sends nothing
    from the host while its hyperparameters stay the same."""
    key = getattr(fg, name + "_key", None)
    if key != values:
        setattr(fg, name, make())
        setattr(fg, name + "_key", values)
    return getattr(fg, name)


def _pack(algo: str, values: dict[str, float], fg: FlatGroup, capturable: bool) -> torch.Tensor:
    if not capturable:
        return pack_scalars(algo, values, fg.state_dtype, fg.device)
    return _cached(fg, "sc", tuple(sorted(values.items())),
                   lambda: pack_scalars(algo, values, fg.state_dtype, fg.device))


def run_kernel(algo: str, opts: tuple, args: tuple, device: torch.device,
               dtype: torch.dtype) -> None:
    """Run the kernel ``algo``/``opts`` on ``args``: compiled unless compilation is switched
    off or failed (then the same function runs eagerly, after a one-time warning). The first
    call of each variant records its time, compilation included, in
    :data:`sgdlab.optim._fast.COMPILE_SECONDS`."""
    if not _config.compile_enabled():
        get_kernel(algo, opts, False)(*args)
        return
    variant = (algo, opts, device.type, dtype, tuple(a is None for a in args))
    if variant in _config.COMPILE_SECONDS:
        get_kernel(algo, opts, True)(*args)
        return
    t0 = time.perf_counter()
    try:
        get_kernel(algo, opts, True)(*args)
    except Exception as exc:  # compilation failed (no C++ compiler, unsupported backend)
        _config.disable_compile(f"{type(exc).__name__}: {exc}")
        warnings.warn(
            "sgdlab fused optimizers: torch.compile failed, the fused step runs its kernels "
            f"eagerly on the flat buffers from now on ({type(exc).__name__}: "
            f"{str(exc)[:300]}). On CPU, inductor needs a C++ compiler (gcc or clang).",
            RuntimeWarning,
            stacklevel=4,
        )
        get_kernel(algo, opts, False)(*args)
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _config.COMPILE_SECONDS[variant] = time.perf_counter() - t0


class _Entry:
    """A param group's flat buffers and the parameter list / state entries they were built
    for (a step with the same ones reuses them without per-parameter checks)."""

    __slots__ = ("params", "keys", "fgs")

    def __init__(self, params: list[torch.Tensor], keys: tuple, fgs: list[FlatGroup]) -> None:
        self.params, self.keys, self.fgs = params, keys, fgs

    def holds(self, params: list[torch.Tensor], keys: tuple) -> bool:
        if keys != self.keys or len(params) != len(self.params):
            return False
        for p, q in zip(params, self.params):
            if p is not q:
                return False
        return all(fg.intact() for fg in self.fgs)


def _build(opt: Any, params: list[torch.Tensor], keys: dict[str, str],
           steps: bool, capturable: bool = False) -> list[FlatGroup] | None:
    fgs = []
    for idx in group_indices(params):
        ps = [params[i] for i in idx]
        for p in ps:
            if not p.is_floating_point() or not p.is_contiguous():
                return None
        for key, init in keys.items():
            if init == "kernel":
                have = {p in opt.state and key in opt.state[p] for p in ps}
                if len(have) > 1:
                    return None
        fg = FlatGroup(ps, opt.state, keys)
        if steps:
            fg.adopt_steps(opt.state, scalar_dtype(), on_device=capturable)
        fgs.append(fg)
    return fgs


def _prepare(opt: Any, group: dict, params: list[torch.Tensor], keys: dict[str, str],
             steps: bool, precheck: Any = None) -> list[FlatGroup] | None:
    """The group's flat buffers (reused, or built from the current parameters and state) with
    the gradients gathered into them; ``None`` (nothing changed) when the fused step does not
    apply (``precheck(opt, params)``, run before building, can decline too)."""
    cache = opt.__dict__.setdefault("_fast_cache", {})
    key_names = tuple(keys)
    entry = cache.get(id(group))
    if entry is None or not entry.holds(params, key_names):
        if entry is not None:  # device-side counters go back to the state before a rebuild
            _sync_fgs(entry.fgs)
        for p in params:
            g = p.grad
            if g.is_sparse or g.shape != p.shape or g.dtype != p.dtype:
                return None
        if precheck is not None and not precheck(opt, params):
            return None
        fgs = _build(opt, params, keys, steps, bool(group.get("capturable")))
        if fgs is None:
            return None
        entry = _Entry(list(params), key_names, fgs)
        cache[id(group)] = entry
    for fg in entry.fgs:
        if not fg.grads_usable():
            return None
    for fg in entry.fgs:
        fg.gather_grads()
        if fg.flat_master is not None:
            fg.sync_master()
    return entry.fgs


def _sgd(opt: Any, group: dict, hp: dict, params: list[torch.Tensor]) -> bool:
    momentum = hp["momentum"]
    keys = {"momentum_buffer": "kernel"} if momentum != 0 else {}
    fgs = _prepare(opt, group, params, keys, steps=False)
    if fgs is None:
        return False
    values = dict(wd=hp["weight_decay"], momentum=momentum,
                  one_minus_dampening=1 - hp["dampening"], neg_lr=-hp["lr"])
    cap = bool(group.get("capturable"))
    for fg in fgs:
        opts = (("maximize", bool(hp["maximize"])), ("weight_decay", hp["weight_decay"] != 0),
                ("momentum", momentum != 0),
                ("init_buffer", bool(fg.fresh.get("momentum_buffer", False))),
                ("nesterov", bool(hp["nesterov"]))) + ((("capturable", True),) if cap else ())
        sc = _pack("sgd", values, fg, cap)
        run_kernel("sgd", opts, (fg.flat_param, fg.flat_grad,
                                 fg.flat_state.get("momentum_buffer"), fg.flat_master, sc),
                   fg.device, fg.dtype)
        fg.finish_fresh(opt.state)
    return True


def _power(power: float) -> str:
    return "half" if power == 0.5 else "one" if power == 1.0 else "general"


def _rmsprop(opt: Any, group: dict, hp: dict, params: list[torch.Tensor]) -> bool:
    keys = {"square_avg": "zeros"}
    if hp["momentum"] > 0:
        keys["momentum_buffer"] = "zeros"
    if hp["centered"]:
        keys["grad_avg"] = "zeros"
    fgs = _prepare(opt, group, params, keys, steps=True)
    if fgs is None:
        return False
    wd = hp["weight_decay"]
    sign = -1.0 if hp["maximize"] else 1.0
    values = dict(wd=wd, alpha=hp["alpha"], one_minus_alpha=1 - hp["alpha"], eps=hp["eps"],
                  power=hp["power"], momentum=hp["momentum"], neg_lr=-hp["lr"],
                  two_sign_wd=2.0 * sign * wd, wd2=wd**2)
    per_example = group["second_moment"] == "per_example"
    cap = bool(group.get("capturable"))
    for fg in fgs:
        m2 = fg.gather(lambda p: p.grad_second_moment) if per_example else None
        opts = (("maximize", bool(hp["maximize"])), ("weight_decay", wd != 0),
                ("centered", bool(hp["centered"])), ("momentum", hp["momentum"] > 0),
                ("power", _power(hp["power"])), ("eps_placement", hp["eps_placement"]))
        sc = _pack("rmsprop", values, fg, cap)
        st = fg.flat_state
        args = (fg.flat_param, fg.flat_grad, st["square_avg"], st.get("grad_avg"),
                st.get("momentum_buffer"), m2, fg.flat_master, sc)
        if cap:  # the kernel advances the device-side step counts
            run_kernel("rmsprop", opts + (("capturable", True),), args + (fg.steps,),
                       fg.device, fg.dtype)
        else:
            fg.steps.add_(1)
            run_kernel("rmsprop", opts, args, fg.device, fg.dtype)
    return True


def _adam_mirror(opt: Any, fg: FlatGroup) -> dict | None:
    """The host-side Adam state shared by all of ``fg``'s parameters, or ``None`` when their
    step counts or debiasing products differ."""
    sigs = set()
    for st, t in zip(fg.state_dicts, fg.steps.tolist()):
        sigs.add((t,) + tuple(st.get(k) for k in _ADAM_HOST_KEYS))
        if len(sigs) > 1:
            return None
    (sig,) = sigs
    mirror: dict[str, Any] = {"step": torch.tensor(sig[0], dtype=scalar_dtype())}
    for k, v in zip(_ADAM_HOST_KEYS, sig[1:]):
        if v is not None:
            mirror[k] = v
    return mirror


def _adam_uniform(opt: Any, params: list[torch.Tensor]) -> bool:
    """Whether all ``params`` share step count and debiasing products (checked before any
    buffer is built, so a group whose parameters missed different steps goes straight to the
    foreach path, step after step, without rebuilding)."""
    first = None
    for p in params:
        st = opt.state[p] if p in opt.state else {}
        if "exp_avg" not in st:
            sig: tuple = (0.0,)
        else:
            t = st.get("step")
            sig = (float(t.item()) if isinstance(t, torch.Tensor) else float(t or 0.0),) + tuple(
                st.get(k) for k in _ADAM_HOST_KEYS)
        if first is None:
            first = sig
        elif sig != first:
            return False
    return True


def _adam(opt: Any, group: dict, hp: dict, params: list[torch.Tensor]) -> bool:
    from sgdlab.optim.adam import adam_scalars

    keys = {"exp_avg": "zeros", "exp_avg_sq": "zeros"}
    if hp["amsgrad"]:
        keys["max_exp_avg_sq"] = "zeros"
    fgs = _prepare(opt, group, params, keys, steps=True, precheck=_adam_uniform)
    if fgs is None:
        return False
    for fg in fgs:
        if not hasattr(fg, "mirror"):
            fg.mirror = _adam_mirror(opt, fg)
        if fg.mirror is None:
            return False
    beta1, beta2 = hp["betas"]
    wd, lr = hp["weight_decay"], hp["lr"]
    sign = -1.0 if hp["maximize"] else 1.0
    per_example = group["second_moment"] == "per_example"
    if group.get("capturable"):
        _adam_capturable(fgs, hp, per_example)
        return True
    for fg in fgs:
        m2 = fg.gather(lambda p: p.grad_second_moment) if per_example else None
        s = adam_scalars(fg.mirror, beta1, beta2, hp["bias_correction"], hp["rebase_betas"])
        fg.steps.add_(1)
        for k in _ADAM_HOST_KEYS:
            if k in fg.mirror:
                v = fg.mirror[k]
                for st in fg.state_dicts:
                    st[k] = v
        values = dict(wd=wd, decay=1 - lr * wd, w1=s.w1, d2=s.d2, w2=s.w2, c2=s.c2,
                      sqrt_c2=math.sqrt(s.c2), eps=hp["eps"], power=hp["power"],
                      step_size=-(lr / s.c1), two_sign_wd=2.0 * sign * wd, wd2=wd**2,
                      eps_sqrt_c2=hp["eps"] * math.sqrt(s.c2),
                      step_size_sqrt_c2=-(lr / s.c1) * math.sqrt(s.c2))
        opts = _adam_opts(hp)
        sc = pack_scalars("adam", values, fg.state_dtype, fg.device)
        st = fg.flat_state
        run_kernel("adam", opts, (fg.flat_param, fg.flat_grad, st["exp_avg"], st["exp_avg_sq"],
                                  st.get("max_exp_avg_sq"), m2, fg.flat_master, sc),
                   fg.device, fg.dtype)
    return True


def _adam_opts(hp: dict) -> tuple:
    return (("maximize", bool(hp["maximize"])), ("weight_decay", hp["weight_decay"] != 0),
            ("decoupled", bool(hp["decoupled_weight_decay"])),
            ("amsgrad", bool(hp["amsgrad"])), ("power", _power(hp["power"])),
            ("eps_placement", hp["eps_placement"]),
            ("corrected", hp["bias_correction"] == "published"))


def _adam_capturable(fgs: list[FlatGroup], hp: dict, per_example: bool) -> None:
    """Adam's step with the step counts and bias corrections advanced on the device (see
    :func:`sgdlab.optim._fast.kernels._capturable`): no host sync, and nothing sent to the
    device unless a hyperparameter changed, so the step can be captured in a CUDA graph."""
    beta1, beta2 = hp["betas"]
    wd, lr, eps = hp["weight_decay"], hp["lr"], hp["eps"]
    sign = -1.0 if hp["maximize"] else 1.0
    n1, n2 = 1.0 / (1.0 - beta1), 1.0 / (1.0 - beta2)
    correction = hp["bias_correction"]
    values = dict(wd=wd, decay=1 - lr * wd, eps=eps, power=hp["power"],
                  two_sign_wd=2.0 * sign * wd, wd2=wd**2)
    opts = _adam_opts(hp) + (("capturable", True), ("correction", correction))
    for fg in fgs:
        if getattr(fg, "correction", None) != correction:
            # start the device counters from the state (host values, or a torch checkpoint's
            # step count with constant betas), as adam_scalars would
            t = float(fg.mirror["step"])
            fg.counters = torch.tensor(
                [fg.mirror.get("beta1_prod", beta1**t), fg.mirror.get("beta2_prod", beta2**t),
                 fg.mirror.get("lecture_count1", min(t, n1)),
                 fg.mirror.get("lecture_count2", min(t, n2))],
                dtype=torch.float64, device=fg.device)
            fg.correction = correction
        if hp["rebase_betas"] and correction == "published":
            # betas set by a scheduler: restart the products from beta^t (adam_scalars)
            fg.counters[:2] = torch.pow(
                torch.tensor([beta1, beta2], dtype=torch.float64, device=fg.device),
                fg.steps[0].to(torch.float64),
            )
        m2 = fg.gather(lambda p: p.grad_second_moment) if per_example else None
        sc = _pack("adam", values, fg, True)
        hp64 = _cached(fg, "hp64", (lr, beta1, beta2, n1, n2, eps), lambda dev=fg.device:
                       torch.tensor([lr, beta1, beta2, n1, n2, eps], dtype=torch.float64,
                                    device=dev))
        st = fg.flat_state
        run_kernel("adam", opts, (fg.flat_param, fg.flat_grad, st["exp_avg"], st["exp_avg_sq"],
                                  st.get("max_exp_avg_sq"), m2, fg.flat_master, sc, fg.steps,
                                  fg.counters, hp64), fg.device, fg.dtype)


_RULES = {"sgd": _sgd, "rmsprop": _rmsprop, "adam": _adam}


@torch._disable_dynamo  # imports dynamo at the first call, not with sgdlab
def fused_update(opt: Any, algo: str, group: dict, hp: dict, params: list[torch.Tensor],
                 enabled: bool) -> bool:
    """Perform ``group``'s step on flat buffers when ``enabled`` and possible (``True``), or
    leave everything unchanged (``False``) and drop the group's flat bookkeeping, since the
    caller's per-tensor path is about to update the state.

    Under ``torch.compile`` of a whole training step this runs outside the traced graph (its
    host-side bookkeeping would recompile at every step), and its kernel runs compiled.
    """
    if enabled and params and _RULES[algo](opt, group, hp, params):
        return True
    forget(opt, group)
    return False


def _sum_of(g: torch.Tensor) -> torch.Tensor:
    """The sum of a flat buffer, accumulated in float32 at least (half-precision sums would
    overflow long before their elements do)."""
    if g.dtype in (torch.float16, torch.bfloat16):
        return g.sum(dtype=torch.float32)
    return g.sum()


@torch._disable_dynamo  # imports dynamo at the first call, not with sgdlab
def grads_all_finite(opt: Any) -> bool:
    """One sum per flat gradient buffer: ``True`` when every gradient is finite and the
    flat buffers of all param groups already exist (gradients are gathered into them, which
    the step does anyway); ``False`` when a gradient is not finite or the quick check does not
    apply (the caller then runs its per-tensor check, which also names the offender)."""
    cache = opt.__dict__.get("_fast_cache")
    if not cache:
        return False
    fgs = []
    for group in opt.param_groups:
        if not group.get("fused") or group.get("second_moment") == "per_example":
            return False
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        entry = cache.get(id(group))
        if entry is None or not entry.holds(params, entry.keys):
            return False
        for fg in entry.fgs:
            if not fg.grads_usable():
                return False
        fgs.extend(entry.fgs)
    for fg in fgs:
        fg.gather_grads()
    if not fgs:
        return False
    # A sum is finite only if every term is (inf and NaN propagate; inf - inf is NaN), so one
    # plain reduction per buffer screens exactly for non-finite gradients at the cost of
    # reading them once. A finite sum proves all finite; a sum that overflows (terms near the
    # float limit) only sends the caller to its per-tensor check, which then finds nothing.
    sums = [_sum_of(fg.flat_grad) for fg in fgs]
    device = sums[0].device
    return bool(torch.isfinite(torch.stack([t.to(device) for t in sums])).all())
