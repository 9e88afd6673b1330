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

from collections.abc import Iterable
from typing import Any

import torch

from sgdlab import hyper as _hyper
from sgdlab._validation import check_choice, check_horizon, check_positive
from sgdlab.averages import lecture_count
from sgdlab.optim import _fast
from sgdlab.optim._base import (
    BatchScaledOptimizer,
    check_hyper,
    check_sparse,
    check_torch_only_flags,
    group_indices,
    hyper_scalar,
    scalar_dtype,
)
from sgdlab.optim._moments import (
    EPS_PLACEMENTS,
    SECOND_MOMENTS,
    as_real,
    check_second_moments,
    denominator,
    denominators_foreach,
    per_example_second_moment,
    second_moment_tensors,
)
from sgdlab.optim.rmsprop import _check_power

__all__ = ["Adam", "BIAS_CORRECTIONS", "adam_reference", "adam_foreach", "AdamScalars"]

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
        n1 = lecture_count(state.get("lecture_count1", min(t - 1.0, 1.0 / (1.0 - beta1))),
                           1.0 / (1.0 - beta1))
        n2 = lecture_count(state.get("lecture_count2", min(t - 1.0, 1.0 / (1.0 - beta2))),
                           1.0 / (1.0 - beta2))
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
        denom = denominator(s, eps=eps, power=power, placement=eps_placement,
                            bias_correction=sc.c2)
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
        s, eps=eps, power=power, placement=eps_placement,
        bias_corrections=None if all(c == 1.0 for c in c2) else c2,
    )
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-(lr / x.c1) for x in scalars])


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
        group["power"] = _check_power(group["power"])

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
        if _fast.fused_update(self, "adam", group, hp, params, self._use_fused(group, params)):
            return
        beta1, beta2 = hp["betas"]
        m2 = (
            [per_example_second_moment(
                p, p.grad, 0.0 if hp["decoupled_weight_decay"] else hp["weight_decay"],
                hp["maximize"]) for p in params]
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
            adam_reference(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, maxes, m2,
                           scalars, **kwargs)
            return
        for idx in group_indices(params):
            # Sub-groups with equal average weights (params that missed steps differ).
            by_w: dict[tuple[float, float, float], list[int]] = {}
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
