r"""Adam with the published and the lecture's bias corrections.

Published Adam (Kingma & Ba 2015), torch.optim.Adam's arithmetic::

    m_t = beta1 m_{t-1} + (1 - beta1) g_t            s_t = beta2 s_{t-1} + (1 - beta2) q_t
    Phi_{t+1} = Phi_t - lr * (m_t / c1_t) / D(s_t / c2_t),   c_j = 1 - prod_{tau<=t} beta_j(tau)

(``c_j = 1 - beta_j^t`` when the betas stay fixed; the product, the data mass of
:func:`sgdlab.averages.ema_mass`, keeps the debiasing exact when a batch-size change moves the
betas). When ``group["betas"]`` itself changes (a scheduler cycling beta1, as OneCycleLR and
CyclicLR with ``cycle_momentum`` do, or an edit), the debiasing is torch's,
``c_j = 1 - beta_j^t`` with the betas now in force, and the product continues from there.
The lecture's "Adam (simplified)" replaces the
debiasing by running-average weights ``1/min(t, N)`` (``bias_correction="lecture"``)::

    mu_t = (1 - 1/min(t, N_g)) mu_{t-1} + (1/min(t, N_g)) g_t,   N_g = 1/(1 - beta1)
    s_t  = (1 - 1/min(t, N_s)) s_{t-1}  + (1/min(t, N_s)) q_t,   N_s = 1/(1 - beta2)
    Phi_{t+1}[i] = Phi_t[i] - lr mu_t[i] / D(s_t[i])

(with a horizon that changes, the count ``min(t, N)`` becomes
:func:`sgdlab.averages.lecture_count`'s ``n_t = min(N_t, n_{t-1} + 1)``)

(REFERENCE.md erratum 9: ``Phi_t[i]``, not ``Phi_t``). Both make the first step
``lr g / (|g| + eps)``, about ``lr sign(g)``. ``bias_correction="none"`` uses the plain
averages. ``q`` and ``D`` are as in :mod:`sgdlab.optim._moments` (``second_moment``,
``power``, ``eps_placement``). ``decoupled_weight_decay`` gives AdamW (Loshchilov & Hutter
2019): ``Phi *= 1 - lr wd`` before the update. Loss assumed: mean over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from sgdlab import hyper as _hyper
from sgdlab._validation import check_choice, check_horizon, check_positive
from sgdlab.averages import lecture_count
from sgdlab.optim._base import (
    BatchScaledOptimizer,
    check_hyper,
    check_sparse,
    check_torch_only_flags,
    hyper_scalar,
)
from sgdlab.optim._common import group_indices, scalar_dtype
from sgdlab.optim._fast import FlatGroup, FusedKernel, write_param
from sgdlab.optim._moments import (
    EPS_PLACEMENTS,
    SECOND_MOMENTS,
    as_real,
    check_power,
    check_second_moments,
    denominator,
    denominators_foreach,
    flat_denominator,
    flat_per_example,
    per_example_second_moment,
    power_form,
    second_moment_tensors,
)

__all__ = [
    "Adam",
    "AdamKernel",
    "AdamScalars",
    "BIAS_CORRECTIONS",
    "adam_foreach",
    "adam_reference",
]

BIAS_CORRECTIONS = ("published", "lecture", "none")


class AdamScalars:
    """The per-tensor scalars of one Adam step: average weights and debiasing factors.

    ``w1, w2``: weights of the new gradient / second-moment sample in the averages;
    ``d2``: decay of the second moment (``1 - w2``, kept separate so the published form
    multiplies by ``beta2`` exactly as torch); ``c1, c2``: debiasing divisors (1 when none).
    """

    __slots__ = ("w1", "d2", "w2", "c1", "c2")

    def __init__(self, w1: float, d2: float, w2: float, c1: float, c2: float) -> None:
        self.w1, self.d2, self.w2, self.c1, self.c2 = w1, d2, w2, c1, c2

    def key(self) -> tuple[float, ...]:
        return (self.w1, self.d2, self.w2, self.c1, self.c2)


def adam_scalars(
    state: dict[str, Any],
    beta1: float,
    beta2: float,
    bias_correction: str,
    rebase: bool = False,
) -> AdamScalars:
    """Advance ``state``'s step count (and debiasing products) and return the step's scalars.

    ``rebase``: the betas were changed by hand or by a scheduler (not by a batch size), so the
    published debiasing restarts from torch's ``1 - beta^t`` with the betas now in force."""
    state["step"] += 1
    t = int(state["step"].item())
    if bias_correction == "lecture":
        # Effective counts n_t = min(N_t, n_{t-1} + 1) (= min(N, t) for a fixed horizon);
        # sgdlab.averages.lecture_count owns the rule for horizons that change.
        n1 = lecture_count(
            state.get("lecture_count1", min(t - 1.0, 1.0 / (1.0 - beta1))), 1.0 / (1.0 - beta1)
        )
        n2 = lecture_count(
            state.get("lecture_count2", min(t - 1.0, 1.0 / (1.0 - beta2))), 1.0 / (1.0 - beta2)
        )
        state["lecture_count1"], state["lecture_count2"] = n1, n2
        return AdamScalars(1.0 / n1, 1.0 - 1.0 / n2, 1.0 / n2, 1.0, 1.0)
    if bias_correction == "none":
        return AdamScalars(1.0 - beta1, beta2, 1.0 - beta2, 1.0, 1.0)
    if rebase or "beta1_prod" not in state:
        # Fresh state, a state dict from torch.optim.Adam, or betas set by a scheduler: as
        # torch, the betas now in force are taken as those of every past step.
        state["beta1_prod"] = beta1 ** (t - 1)
        state["beta2_prod"] = beta2 ** (t - 1)
    state["beta1_prod"] *= beta1
    state["beta2_prod"] *= beta2
    return AdamScalars(
        1.0 - beta1, beta2, 1.0 - beta2, 1.0 - state["beta1_prod"], 1.0 - state["beta2_prod"]
    )


def adam_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor | None],
    second_moments: list[torch.Tensor] | None,
    scalars: list[AdamScalars],
    *,
    lr: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    power: float,
    eps_placement: str,
) -> None:
    """One Adam step, tensor by tensor (the readable reference)."""
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
        as_real(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    )
    for i, p in enumerate(params):
        sc = scalars[i]
        g = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        exp_avgs[i].lerp_(g, sc.w1)
        if second_moments is None:
            exp_avg_sqs[i].mul_(sc.d2).addcmul_(g, g, value=sc.w2)
        else:
            exp_avg_sqs[i].mul_(sc.d2).add_(second_moments[i], alpha=sc.w2)
        s = exp_avg_sqs[i]
        if amsgrad:
            mx = max_exp_avg_sqs[i]
            assert mx is not None
            torch.maximum(mx, s, out=mx)
            s = mx
        denom = denominator(s, eps=eps, power=power, placement=eps_placement, bias_correction=sc.c2)
        p.addcdiv_(exp_avgs[i], denom, value=-(lr / sc.c1))


def adam_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor | None],
    second_moments: list[torch.Tensor] | None,
    scalars: list[AdamScalars],
    *,
    lr: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
    power: float,
    eps_placement: str,
) -> None:
    """:func:`adam_reference` with multi-tensor kernels. All tensors share device and dtype
    and all ``scalars`` are equal except the debiasing divisors."""
    if not params:
        return
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
        as_real(ts) for ts in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    )
    sc = scalars[0]
    g = torch._foreach_neg(grads) if maximize else list(grads)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        elif maximize:
            torch._foreach_add_(g, params, alpha=weight_decay)
        else:
            g = torch._foreach_add(g, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, g, sc.w1)
    torch._foreach_mul_(exp_avg_sqs, sc.d2)
    if second_moments is None:
        torch._foreach_addcmul_(exp_avg_sqs, g, g, value=sc.w2)
    else:
        torch._foreach_add_(exp_avg_sqs, second_moments, alpha=sc.w2)
    s = exp_avg_sqs
    if amsgrad:
        mx = [t for t in max_exp_avg_sqs if t is not None]
        torch._foreach_maximum_(mx, exp_avg_sqs)
        s = mx
    c2 = [x.c2 for x in scalars]
    denom = denominators_foreach(
        s,
        eps=eps,
        power=power,
        placement=eps_placement,
        bias_corrections=None if all(c == 1.0 for c in c2) else c2,
    )
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-(lr / x.c1) for x in scalars])


_HOST_KEYS = ("beta1_prod", "beta2_prod", "lecture_count1", "lecture_count2")


class _AdamHost:
    """The host-side Adam state of one flat group, shared by all its parameters: ``mirror``
    (step count and debiasing products, advanced by :func:`adam_scalars`), and for capturable
    steps ``counters`` (the same on the device, float64: beta1 product, beta2 product,
    lecture counts 1 and 2) with the ``correction`` they were started for."""

    __slots__ = ("mirror", "counters", "correction")

    def __init__(self, mirror: dict[str, Any]) -> None:
        self.mirror = mirror
        self.counters: torch.Tensor | None = None
        self.correction: str | None = None


def _host_signature(st: dict[str, Any], step: float) -> tuple:
    return (step,) + tuple(st.get(k) for k in _HOST_KEYS)


def _step_of(st: dict[str, Any]) -> float:
    t = st.get("step")
    return float(t.item()) if isinstance(t, torch.Tensor) else float(t or 0.0)


class AdamKernel(FusedKernel):
    r"""Adam's fused step: :func:`adam_reference` on one flat buffer.

    The bias corrections are per flat group: all its parameters must share their step count
    and debiasing products (else :meth:`accepts` declines and the group takes the foreach
    path). Capturable steps advance the counts and corrections on the device, in float64,
    with the arithmetic of :func:`adam_scalars` (extra arguments ``steps``, ``counters``,
    ``hp`` = (lr, beta1, beta2, N1, N2, eps)). With ``power = 1/2`` outside the root the step
    is ``(lr sqrt(c2)/c1) m / (sqrt(v) + eps sqrt(c2))``: one division per element, equal to
    the reference up to rounding."""

    name = "adam"
    scalars = ("wd", "decay", "w1", "d2", "w2", "c2", "sqrt_c2", "eps", "power", "step_size",
               "two_sign_wd", "wd2", "eps_sqrt_c2", "step_size_sqrt_c2")  # fmt: skip
    buffers = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    counts_steps = True

    def keys(self, hp: dict[str, Any]) -> dict[str, str]:
        keys = {"exp_avg": "zeros", "exp_avg_sq": "zeros"}
        if hp["amsgrad"]:
            keys["max_exp_avg_sq"] = "zeros"
        return keys

    def accepts(self, state: dict, params: list[torch.Tensor]) -> bool:
        """All ``params`` share step count and debiasing products (a group whose parameters
        missed different steps goes to the foreach path, step after step, without
        rebuilding)."""
        sigs = set()
        for p in params:
            st = state[p] if p in state else {}
            sigs.add(_host_signature(st, _step_of(st)) if "exp_avg" in st else (0.0,))
            if len(sigs) > 1:
                return False
        return True

    def adopt(self, fg: FlatGroup) -> bool:
        if fg.host is None:
            sigs = {_host_signature(st, t) for st, t in zip(fg.state_dicts, fg.steps.tolist())}
            if len(sigs) != 1:
                return False
            (sig,) = sigs
            mirror: dict[str, Any] = {"step": torch.tensor(sig[0], dtype=scalar_dtype())}
            mirror.update({k: v for k, v in zip(_HOST_KEYS, sig[1:]) if v is not None})
            fg.host = _AdamHost(mirror)
        return True

    def options(self, hp: dict[str, Any], fg: FlatGroup) -> tuple[tuple[str, Any], ...]:
        opts: tuple[tuple[str, Any], ...] = (
            ("maximize", bool(hp["maximize"])),
            ("weight_decay", hp["weight_decay"] != 0),
            ("decoupled", bool(hp["decoupled_weight_decay"])),
            ("amsgrad", bool(hp["amsgrad"])),
            ("power", power_form(hp["power"])),
            ("eps_placement", hp["eps_placement"]),
            ("corrected", hp["bias_correction"] == "published"),
        )
        if hp.get("capturable"):
            opts += (("capturable", True), ("correction", hp["bias_correction"]))
        return opts

    def values(self, hp: dict[str, Any], fg: FlatGroup) -> dict[str, float]:
        beta1, beta2 = hp["betas"]
        wd, lr, eps = hp["weight_decay"], hp["lr"], hp["eps"]
        sign = -1.0 if hp["maximize"] else 1.0
        values = dict(wd=wd, decay=1 - lr * wd, eps=eps, power=hp["power"],
                      two_sign_wd=2.0 * sign * wd, wd2=wd**2)  # fmt: skip
        host: _AdamHost = fg.host
        if hp.get("capturable"):
            self._start_counters(hp, fg, host)
            return values
        s = adam_scalars(host.mirror, beta1, beta2, hp["bias_correction"], hp["rebase_betas"])
        for k in _HOST_KEYS:
            if k in host.mirror:
                for st in fg.state_dicts:
                    st[k] = host.mirror[k]
        root = math.sqrt(s.c2)
        values.update(w1=s.w1, d2=s.d2, w2=s.w2, c2=s.c2, sqrt_c2=root,
                      step_size=-(lr / s.c1), eps_sqrt_c2=eps * root,
                      step_size_sqrt_c2=-(lr / s.c1) * root)  # fmt: skip
        return values

    @staticmethod
    def _start_counters(hp: dict[str, Any], fg: FlatGroup, host: _AdamHost) -> None:
        """Start the device counters from the state (host values, or a torch checkpoint's step
        count with constant betas), as :func:`adam_scalars` would; restart the products from
        ``beta^t`` when a scheduler moved the betas."""
        beta1, beta2 = hp["betas"]
        correction = hp["bias_correction"]
        if host.correction != correction:
            t, m = float(host.mirror["step"]), host.mirror
            n1, n2 = 1.0 / (1.0 - beta1), 1.0 / (1.0 - beta2)
            host.counters = torch.tensor(
                [m.get("beta1_prod", beta1**t), m.get("beta2_prod", beta2**t),
                 m.get("lecture_count1", min(t, n1)), m.get("lecture_count2", min(t, n2))],
                dtype=torch.float64, device=fg.device,
            )  # fmt: skip
            host.correction = correction
        if hp["rebase_betas"] and correction == "published":
            assert host.counters is not None
            host.counters[:2] = torch.pow(
                torch.tensor([beta1, beta2], dtype=torch.float64, device=fg.device),
                fg.steps[0].to(torch.float64),
            )

    def extra_args(self, hp: dict[str, Any], fg: FlatGroup) -> tuple:
        if not hp.get("capturable"):
            return ()
        beta1, beta2 = hp["betas"]
        hp6 = (hp["lr"], beta1, beta2, 1.0 / (1.0 - beta1), 1.0 / (1.0 - beta2), hp["eps"])
        hp64 = fg.cached(
            "hp64", hp6, lambda: torch.tensor(hp6, dtype=torch.float64, device=fg.device)
        )
        return (fg.steps, fg.host.counters, hp64)

    def sync(self, fg: FlatGroup) -> None:
        host = fg.host
        if host is None or host.counters is None:
            return
        p1, p2, n1, n2 = host.counters.tolist()
        for st in fg.state_dicts:
            if host.correction == "published":
                st["beta1_prod"], st["beta2_prod"] = p1, p2
            elif host.correction == "lecture":
                st["lecture_count1"], st["lecture_count2"] = n1, n2

    def function(self, opts: tuple[tuple[str, Any], ...]) -> Callable[..., None]:
        o, ix = dict(opts), self.index()

        def adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, m2, master, sc):
            x = master if master is not None else p
            raw = g.to(x.dtype)
            d = -raw if o["maximize"] else raw
            q = None
            if m2 is not None:
                # AdamW's decay is not part of the gradient: no decay terms in q.
                q = flat_per_example(m2, x, raw, sc[ix["two_sign_wd"]], sc[ix["wd2"]],
                                     o["weight_decay"] and not o["decoupled"])  # fmt: skip
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
                denom = v.sqrt() + sc[ix["eps_sqrt_c2"]]
                step = sc[ix["step_size_sqrt_c2"]]
            else:
                corrected = o["corrected"]
                denom = flat_denominator(
                    v, sc[ix["eps"]], sc[ix["power"]], sc[ix["c2"]] if corrected else None,
                    sc[ix["sqrt_c2"]] if corrected else None,
                    form=o["power"], placement=o["eps_placement"],
                )  # fmt: skip
                step = sc[ix["step_size"]]
            write_param(p, master, x + step * (m / denom))

        if not o.get("capturable"):
            return adam
        correction = o["correction"]

        def adam_capturable(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, m2, master, sc, steps,
                            counters, hp):  # fmt: skip
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
            sqrt_c2 = c2.sqrt()
            computed = {"w1": w1, "d2": d2, "w2": w2, "c2": c2, "sqrt_c2": sqrt_c2,
                        "step_size": -(lr / c1), "eps_sqrt_c2": hp[5] * sqrt_c2,
                        "step_size_sqrt_c2": -(lr / c1) * sqrt_c2}  # fmt: skip
            full = torch.stack([computed[k].to(sc.dtype) if k in computed else sc[i]
                                for k, i in ix.items()])  # fmt: skip
            adam(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, m2, master, full)

        return adam_capturable


class Adam(BatchScaledOptimizer):
    r"""Adam / AdamW with the lecture's options.

    A drop-in replacement for :class:`torch.optim.Adam` (and ``AdamW`` with
    ``decoupled_weight_decay=True``): with default options it performs the same update, to
    rounding (the bias correction uses the running product of the betas, which a change of
    batch size may move, where torch computes ``beta**step``: the two differ in the last bit,
    about 1e-16 in float64; betas set by a scheduler debias as torch's), with the same state
    names (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so checkpoints move
    between the two.
    Complex parameters are stepped as pairs of reals (``torch.view_as_real``), as torch
    does (the fused path takes the foreach path for them).

    Args:
        params: parameters or param groups.
        lr: learning rate per step (>= 0).
        betas: ``(beta1, beta2) = (1 - 1/N_g, 1 - 1/N_s)``, each in [0, 1).
        eps: added to the denominator (>= 0), where ``eps_placement`` says.
        weight_decay: L2 penalty (coupled) or AdamW decay (``decoupled_weight_decay``).
        amsgrad: use the running maximum of the second moment (Reddi et al. 2018).
        maximize: maximize the objective.
        decoupled_weight_decay: AdamW.
        bias_correction: ``"published"`` (``1/(1 - beta^t)``), ``"lecture"``
            (``1/min(t, N)`` average weights) or ``"none"``.
        eps_placement, power, second_moment: as :class:`sgdlab.RMSProp`.
        capturable: ``True`` keeps the step counts and bias corrections on the parameters'
            device, advanced by the kernel, and sends nothing from the host while the
            hyperparameters stay the same, so ``step()`` can be captured in a CUDA graph (after
            warm-up steps, as with torch). Implies the fused path and ``nonfinite="ignore"``.
            A new lr or batch size reaches the device on the next eager step (re-capture a
            graph to use it there).
        batch_size, ref_batch_size, scaling, foreach, nonfinite, fused, differentiable: as
            :class:`sgdlab.SGD` (``nonfinite`` defaults to ``"raise"``, ``"ignore"`` when
            capturable);
            ``scaling`` defaults to ``"sqrt"`` (batch) or ``"linear"`` (per-example).

    Example:
        >>> import torch, sgdlab
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = sgdlab.Adam(model.parameters(), lr=1e-3, ref_batch_size=32)
        >>> model(torch.randn(128, 3)).pow(2).mean().backward()
        >>> opt.step(batch_size=128)  # square-root rule: lr 2e-3, betas (0.6, 0.996)
    """

    _momentum_form = "ema"
    _torch_name = "Adam"
    _state_keys = {
        "step": "step",
        "exp_avg": "param",
        "exp_avg_sq": "param",
        "max_exp_avg_sq": "param",
        "master_param": "param",
        "beta1_prod": "scalar",
        "beta2_prod": "scalar",
        "lecture_count1": "scalar",
        "lecture_count2": "scalar",
    }
    _state_required = ("step", "exp_avg", "exp_avg_sq")
    _group_required = ("lr", "betas", "eps", "weight_decay")
    _fused_kernel = AdamKernel()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        bias_correction: str = "published",
        eps_placement: str = "outside",
        power: float = 0.5,
        second_moment: str = "batch",
        batch_size: int | None = None,
        ref_batch_size: int | None = None,
        scaling: str | None = None,
        foreach: bool | None = None,
        nonfinite: str | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_torch_only_flags("Adam", differentiable=differentiable)
        check_choice("second_moment", second_moment, SECOND_MOMENTS)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            bias_correction=bias_correction,
            eps_placement=eps_placement,
            power=power,
            second_moment=second_moment,
        )
        super().__init__(
            params,
            defaults,
            batch_size=batch_size,
            ref_batch_size=ref_batch_size,
            scaling=scaling,
            default_scaling="linear" if second_moment == "per_example" else "sqrt",
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
            capturable=capturable,
        )

    @classmethod
    def from_conjugate(
        cls,
        params: Iterable[Any],
        eta_prime: float,
        n_g: float,
        n_s: float,
        *,
        eps: float = 1e-8,
        batch_size: int = 1,
        scaling: str = "linear",
        second_moment: str = "per_example",
        **kwargs: Any,
    ) -> Adam:
        """Build from conjugate units (per-example ``eta'``, horizons ``N'_g``, ``N'_s`` in
        examples, ``eps`` at B = 1) at batch size ``B``. Defaults to the lecture's
        batch-size-invariant combination: per-example second moments with the linear rule
        (``lr = B eta'``)."""
        check_positive("eta_prime", eta_prime)
        check_horizon("n_g", n_g)
        check_horizon("n_s", n_s)
        step = _hyper.to_per_step(
            _hyper.Conjugate(eta_prime=eta_prime, n_g=n_g, n_s=n_s, eps=eps),
            batch_size,
            scaling,
            "ema",
        )
        return cls(
            params,
            lr=step.lr,
            betas=(step.beta1, step.beta2),
            eps=step.eps,
            second_moment=second_moment,
            batch_size=batch_size,
            ref_batch_size=batch_size,
            scaling=scaling,
            **kwargs,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        for key in ("lr", "eps", "weight_decay"):
            check_hyper(group, key)
        betas = group["betas"]
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        tensors = [isinstance(b, torch.Tensor) for b in betas]
        if tensors[0] != tensors[1]:
            raise ValueError(f"betas must be both numbers or both tensors (as torch), got {betas}")
        for j, b in enumerate(betas):
            x = hyper_scalar(f"betas[{j}]", b)
            if not 0.0 <= x < 1.0:
                raise ValueError(f"betas[{j}] must satisfy 0 <= beta < 1, got {b!r}")
        group["betas"] = tuple(b if t else float(b) for b, t in zip(betas, tensors))
        if group["foreach"] and not group.get("capturable"):
            # torch.optim.Adam refuses these too: its foreach kernels take Python scalars.
            for key, value in (("lr", group["lr"]), ("betas", betas[0])):
                if isinstance(value, torch.Tensor):
                    raise ValueError(
                        f"{key} as a tensor is not supported with foreach=True (as in "
                        f"torch.optim.Adam); pass a float, or leave foreach unset"
                    )
        check_choice("bias_correction", group["bias_correction"], BIAS_CORRECTIONS)
        check_choice("eps_placement", group["eps_placement"], EPS_PLACEMENTS)
        check_choice("second_moment", group["second_moment"], SECOND_MOMENTS)
        group["power"] = check_power(group["power"])

    def _hyper_of(self, group: dict[str, Any]) -> _hyper.PerStep:
        b1, b2 = group["betas"]
        return _hyper.PerStep(lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"])

    def _with_hyper(self, group: dict[str, Any], step: _hyper.PerStep) -> dict[str, Any]:
        return {"lr": step.lr, "betas": (step.beta1, step.beta2), "eps": step.eps}

    def _betas_moved(self, group: dict[str, Any]) -> bool:
        """Whether ``group["betas"]`` changed since the group's last step (a scheduler cycling
        beta1, as OneCycleLR and CyclicLR do, or an edit), recording the betas of this step.

        Such a change debiases as torch.optim.Adam does, ``c_j = 1 - beta_j^t`` with the betas
        now in force (moved by the batch-size rule when ``B != B0``). A change that only a
        change of batch size makes keeps the running product ``1 - prod beta_j``, whose data
        mass is exact across batch sizes (:func:`sgdlab.averages.ema_mass`)."""
        asked = tuple(hyper_scalar(f"betas[{j}]", b) for j, b in enumerate(group["betas"]))
        before = group.get("betas_asked")
        group["betas_asked"] = asked
        return before is not None and tuple(before) != asked

    def _precheck(self, group: dict[str, Any]) -> None:
        check_sparse(self._group_index(group), group, "Adam")
        check_second_moments(group)

    def _extra_tensors(self, group: dict[str, Any], p: torch.Tensor) -> list[torch.Tensor]:
        return second_moment_tensors(group, p)

    def _update_group(self, group: dict[str, Any], hp: dict[str, Any], foreach: bool) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        hp["rebase_betas"] = self._betas_moved(group)
        if self._step_fused(group, hp, params):
            return
        beta1, beta2 = hp["betas"]
        m2 = (
            [
                per_example_second_moment(
                    p,
                    p.grad,
                    0.0 if hp["decoupled_weight_decay"] else hp["weight_decay"],
                    hp["maximize"],
                )
                for p in params
            ]
            if group["second_moment"] == "per_example"
            else None
        )
        exp_avgs, exp_avg_sqs, maxes, scalars = [], [], [], []
        for p in params:
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=scalar_dtype())
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if hp["amsgrad"] and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            scalars.append(
                adam_scalars(st, beta1, beta2, hp["bias_correction"], hp["rebase_betas"])
            )
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            maxes.append(st.get("max_exp_avg_sq"))
        kwargs = dict(
            lr=hp["lr"],
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            decoupled_weight_decay=hp["decoupled_weight_decay"],
            amsgrad=hp["amsgrad"],
            maximize=hp["maximize"],
            power=hp["power"],
            eps_placement=hp["eps_placement"],
        )
        if not foreach:
            adam_reference(
                params,
                [p.grad for p in params],
                exp_avgs,
                exp_avg_sqs,
                maxes,
                m2,
                scalars,
                **kwargs,
            )
            return
        for idx in group_indices(params):
            # Sub-groups with equal average weights (params that missed steps differ).
            by_w: dict[tuple[float, ...], list[int]] = {}
            for i in idx:
                by_w.setdefault(scalars[i].key()[:3], []).append(i)
            for sub in by_w.values():
                adam_foreach(
                    [params[i] for i in sub],
                    [params[i].grad for i in sub],
                    [exp_avgs[i] for i in sub],
                    [exp_avg_sqs[i] for i in sub],
                    [maxes[i] for i in sub],
                    [m2[i] for i in sub] if m2 is not None else None,
                    [scalars[i] for i in sub],
                    **kwargs,
                )
