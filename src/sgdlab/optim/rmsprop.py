r"""RMSProp in the lecture's form, with torch.optim.RMSprop as its default special case.

The lecture ("RMSProp", "RMSProp is theoretically mysterious")::

    s_t[i]       = (1 - 1/N_s) s_{t-1}[i] + (1/N_s) q_t[i]
    Phi_{t+1}[i] = Phi_t[i] - eta * g_hat_t[i] / D(s_t[i])

with ``alpha = 1 - 1/N_s``, ``q = g_hat^2`` (``second_moment="batch"``, torch) or the batch mean
of per-example squared gradients (``"per_example"``, the lecture's batch-size-invariant
RMSProp), and ``D(s) = s^power + eps`` (``eps_placement="outside"``, torch) or
``(s + eps)^power`` (``"inside"``, the lecture's ``sqrt(s + eps)``). ``power = 1/2`` divides by
sigma (RMSProp); ``power = 1`` divides by sigma^2, the variant the lecture calls theoretically
motivated (units of eta: loss). ``centered`` subtracts the squared running mean gradient as
torch does; ``momentum`` adds a heavy-ball buffer ``b = m b + g_hat / D``, ``Phi -= lr b``.

Batch-size scaling (Malladi et al. 2022): with the batch second moment, noise-dominated
dynamics per example are invariant under the square-root rule (``lr x sqrt(k)``,
``(1 - alpha) x k`` while alpha >= 1/2, then alpha^k as :mod:`sgdlab.hyper` says,
``eps / sqrt(k)``), the default ``scaling`` here; with per-example second
moments, under the linear rule (the default when ``second_moment="per_example"``).
REFERENCE.md: Var(B=16)/Var(B=1) = 1.006 (batch+sqrt), 4.08 (batch+linear), 1.003
(per-example+linear). Loss assumed: mean over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from sgdlab import hyper as _hyper
from sgdlab._validation import check_choice, check_horizon, check_positive
from sgdlab.optim._base import (
    BatchScaledOptimizer,
    check_hyper,
    check_sparse,
    check_torch_only_flags,
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

__all__ = ["RMSProp", "RMSPropKernel", "rmsprop_reference", "rmsprop_foreach"]


def rmsprop_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    square_avgs: list[torch.Tensor],
    grad_avgs: list[torch.Tensor | None],
    bufs: list[torch.Tensor | None],
    second_moments: list[torch.Tensor] | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    power: float,
    eps_placement: str,
) -> None:
    """One RMSProp step, tensor by tensor (the readable reference). ``second_moments`` holds
    the per-example statistic of each parameter (or ``None`` for the batch second moment)."""
    params, grads, square_avgs, grad_avgs, bufs = (
        as_real(ts) for ts in (params, grads, square_avgs, grad_avgs, bufs)
    )
    for i, p in enumerate(params):
        g = grads[i] if not maximize else -grads[i]
        s = square_avgs[i]
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if second_moments is None:
            s.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        else:
            s.mul_(alpha).add_(second_moments[i], alpha=1 - alpha)
        if centered:
            ga = grad_avgs[i]
            assert ga is not None
            ga.lerp_(g, 1 - alpha)
            var = s.addcmul(ga, ga, value=-1)
            avg = denominator(var, eps=eps, power=power, placement=eps_placement)
        else:
            avg = denominator(s, eps=eps, power=power, placement=eps_placement)
        if momentum > 0:
            buf = bufs[i]
            assert buf is not None
            buf.mul_(momentum).addcdiv_(g, avg)
            p.add_(buf, alpha=-lr)
        else:
            p.addcdiv_(g, avg, value=-lr)


def rmsprop_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    square_avgs: list[torch.Tensor],
    grad_avgs: list[torch.Tensor | None],
    bufs: list[torch.Tensor | None],
    second_moments: list[torch.Tensor] | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    power: float,
    eps_placement: str,
) -> None:
    """:func:`rmsprop_reference` with multi-tensor kernels (one device and dtype)."""
    if not params:
        return
    params, grads, square_avgs, grad_avgs, bufs = (
        as_real(ts) for ts in (params, grads, square_avgs, grad_avgs, bufs)
    )
    g = torch._foreach_neg(grads) if maximize else list(grads)
    if weight_decay != 0:
        if maximize:
            torch._foreach_add_(g, params, alpha=weight_decay)
        else:
            g = torch._foreach_add(g, params, alpha=weight_decay)
    torch._foreach_mul_(square_avgs, alpha)
    if second_moments is None:
        torch._foreach_addcmul_(square_avgs, g, g, value=1 - alpha)
    else:
        torch._foreach_add_(square_avgs, second_moments, alpha=1 - alpha)
    if centered:
        gas = [t for t in grad_avgs if t is not None]
        torch._foreach_lerp_(gas, g, 1 - alpha)
        var = torch._foreach_addcmul(square_avgs, gas, gas, value=-1)
        avg = denominators_foreach(var, eps=eps, power=power, placement=eps_placement)
    else:
        avg = denominators_foreach(square_avgs, eps=eps, power=power, placement=eps_placement)
    if momentum > 0:
        bs = [b for b in bufs if b is not None]
        torch._foreach_mul_(bs, momentum)
        torch._foreach_addcdiv_(bs, g, avg)
        torch._foreach_add_(params, bs, alpha=-lr)
    else:
        torch._foreach_addcdiv_(params, g, avg, value=-lr)


class RMSPropKernel(FusedKernel):
    """RMSProp's fused step: :func:`rmsprop_reference` on one flat buffer. Capturable steps
    advance the device-side step counts in the kernel (extra argument ``steps``)."""

    name = "rmsprop"
    scalars = ("wd", "alpha", "one_minus_alpha", "eps", "power", "momentum", "neg_lr",
               "two_sign_wd", "wd2")  # fmt: skip
    buffers = ("square_avg", "grad_avg", "momentum_buffer")
    counts_steps = True

    def keys(self, hp: dict[str, Any]) -> dict[str, str]:
        keys = {"square_avg": "zeros"}
        if hp["momentum"] > 0:
            keys["momentum_buffer"] = "zeros"
        if hp["centered"]:
            keys["grad_avg"] = "zeros"
        return keys

    def options(self, hp: dict[str, Any], fg: FlatGroup) -> tuple[tuple[str, Any], ...]:
        opts: tuple[tuple[str, Any], ...] = (
            ("maximize", bool(hp["maximize"])),
            ("weight_decay", hp["weight_decay"] != 0),
            ("centered", bool(hp["centered"])),
            ("momentum", hp["momentum"] > 0),
            ("power", power_form(hp["power"])),
            ("eps_placement", hp["eps_placement"]),
        )
        return opts + ((("capturable", True),) if hp.get("capturable") else ())

    def values(self, hp: dict[str, Any], fg: FlatGroup) -> dict[str, float]:
        wd = hp["weight_decay"]
        sign = -1.0 if hp["maximize"] else 1.0
        return dict(wd=wd, alpha=hp["alpha"], one_minus_alpha=1 - hp["alpha"], eps=hp["eps"],
                    power=hp["power"], momentum=hp["momentum"], neg_lr=-hp["lr"],
                    two_sign_wd=2.0 * sign * wd, wd2=wd**2)  # fmt: skip

    def extra_args(self, hp: dict[str, Any], fg: FlatGroup) -> tuple:
        return (fg.steps,) if hp.get("capturable") else ()

    def function(self, opts: tuple[tuple[str, Any], ...]) -> Callable[..., None]:
        o, ix = dict(opts), self.index()

        def rmsprop(p, g, square_avg, grad_avg, buf, m2, master, sc):
            x = master if master is not None else p
            raw = g.to(x.dtype)
            d = -raw if o["maximize"] else raw
            if o["weight_decay"]:
                d = d + sc[ix["wd"]] * x
            if m2 is not None:
                q = flat_per_example(m2, x, raw, sc[ix["two_sign_wd"]], sc[ix["wd2"]],
                                     o["weight_decay"])  # fmt: skip
                s = square_avg * sc[ix["alpha"]] + sc[ix["one_minus_alpha"]] * q
            else:
                s = square_avg * sc[ix["alpha"]] + sc[ix["one_minus_alpha"]] * d * d
            square_avg.copy_(s)
            if o["centered"]:
                ga = torch.lerp(grad_avg, d, sc[ix["one_minus_alpha"]])
                grad_avg.copy_(ga)
                s = s - ga * ga
            avg = flat_denominator(s, sc[ix["eps"]], sc[ix["power"]], None, None,
                                   form=o["power"], placement=o["eps_placement"])  # fmt: skip
            if o["momentum"]:
                b = buf * sc[ix["momentum"]] + d / avg
                buf.copy_(b)
                x = x + sc[ix["neg_lr"]] * b
            else:
                x = x + sc[ix["neg_lr"]] * (d / avg)
            write_param(p, master, x)

        if not o.get("capturable"):
            return rmsprop

        def rmsprop_capturable(p, g, square_avg, grad_avg, buf, m2, master, sc, steps):
            steps.copy_(steps + 1)
            rmsprop(p, g, square_avg, grad_avg, buf, m2, master, sc)

        return rmsprop_capturable


class RMSProp(BatchScaledOptimizer):
    r"""RMSProp (Tieleman & Hinton 2012) in the lecture's form.

    A drop-in replacement for :class:`torch.optim.RMSprop`: with default options it performs
    the same arithmetic (identical in float64) and uses the same state names (``step``,
    ``square_avg``, ``momentum_buffer``, ``grad_avg``), so state dicts move between the two.
    The arguments up to ``differentiable`` may be given by position, in torch's order.
    Complex parameters are stepped as pairs of reals (``torch.view_as_real``), as torch
    does (the fused path takes the foreach path for them).

    Args:
        params: parameters or param groups.
        lr: learning rate per step (>= 0).
        alpha: second-moment decay ``1 - 1/N_s`` (0 <= alpha < 1).
        eps: added to the denominator (>= 0), where ``eps_placement`` says.
        weight_decay: L2 penalty added to the gradient.
        momentum: heavy-ball momentum on the normalised step (0 <= momentum < 1).
        centered: divide by the running variance instead of the second moment.
        maximize: maximize the objective.
        eps_placement: ``"outside"`` (torch: ``sqrt(s) + eps``) or ``"inside"`` (the
            lecture: ``sqrt(s + eps)``).
        power: 0.5 (divide by sigma) or 1 (divide by sigma^2); any value in (0, 1].
        second_moment: ``"batch"`` (square of the batch-mean gradient) or ``"per_example"``
            (``p.grad_second_moment`` from :func:`sgdlab.stats.track`).
        capturable: as :class:`sgdlab.Adam` (device-side step counts: ``step()`` can be
            captured in a CUDA graph).
        batch_size, ref_batch_size, scaling, foreach, nonfinite, fused, differentiable: as
            :class:`sgdlab.SGD` (``nonfinite`` defaults to ``"raise"``, ``"ignore"`` when
            capturable);
            ``scaling`` defaults to ``"sqrt"`` (batch) or ``"linear"`` (per-example).

    Example:
        >>> import torch, sgdlab
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = sgdlab.RMSProp(model.parameters(), lr=1e-2, power=1.0, eps=1e-6)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
    """

    _momentum_form = "heavy_ball"
    _torch_name = "RMSprop"
    _state_keys = {
        "step": "step",
        "square_avg": "param",
        "momentum_buffer": "param",
        "grad_avg": "param",
        "master_param": "param",
    }
    _state_required = ("step", "square_avg")
    _group_required = ("lr", "alpha", "eps", "weight_decay")
    _fused_kernel = RMSPropKernel()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        eps_placement: str = "outside",
        power: float = 0.5,
        second_moment: str = "batch",
        batch_size: int | None = None,
        ref_batch_size: int | None = None,
        scaling: str | None = None,
        nonfinite: str | None = None,
        fused: bool | None = None,
    ) -> None:
        check_torch_only_flags("RMSProp", differentiable=differentiable)
        check_choice("second_moment", second_moment, SECOND_MOMENTS)
        defaults = dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
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
        n_s: float,
        n_g: float = 1.0,
        *,
        eps: float = 1e-8,
        batch_size: int = 1,
        scaling: str = "linear",
        second_moment: str = "per_example",
        **kwargs: Any,
    ) -> RMSProp:
        """Build from conjugate units (per-example ``eta'``, horizons ``N'_s``, ``N'_g`` in
        examples, ``eps`` at B = 1) at batch size ``B``. Defaults to the lecture's
        batch-size-invariant combination: per-example second moments with the linear rule."""
        check_positive("eta_prime", eta_prime)
        check_horizon("n_s", n_s)
        check_horizon("n_g", n_g)
        step = _hyper.to_per_step(
            _hyper.Conjugate(eta_prime=eta_prime, n_g=n_g, n_s=n_s, eps=eps),
            batch_size,
            scaling,
            "heavy_ball",
        )
        return cls(
            params,
            lr=step.lr,
            alpha=step.beta2,
            eps=step.eps,
            momentum=step.beta1,
            second_moment=second_moment,
            batch_size=batch_size,
            ref_batch_size=batch_size,
            scaling=scaling,
            **kwargs,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        for key in ("lr", "eps", "weight_decay"):
            check_hyper(group, key)
        for key in ("alpha", "momentum"):
            check_hyper(group, key, below_one=True)
        check_choice("eps_placement", group["eps_placement"], EPS_PLACEMENTS)
        check_choice("second_moment", group["second_moment"], SECOND_MOMENTS)
        group["power"] = check_power(group["power"])

    def _hyper_of(self, group: dict[str, Any]) -> _hyper.PerStep:
        return _hyper.PerStep(
            lr=group["lr"], beta1=group["momentum"], beta2=group["alpha"], eps=group["eps"]
        )

    def _with_hyper(self, group: dict[str, Any], step: _hyper.PerStep) -> dict[str, Any]:
        return {"lr": step.lr, "momentum": step.beta1, "alpha": step.beta2, "eps": step.eps}

    def _precheck(self, group: dict[str, Any]) -> None:
        check_sparse(self._group_index(group), group, "RMSProp")
        check_second_moments(group)
        if group["centered"] and any(p.grad is not None for p in group["params"]):
            alpha = self.effective_hyperparameters(group)["alpha"]
            if alpha == 0.0:
                raise ValueError(
                    f"centered=True with an effective alpha of 0 (alpha={group['alpha']!r}, "
                    f"scaling={group['scaling']!r}, batch size {group.get('batch_size')!r}) "
                    "divides by eps alone: use scaling='exact', alpha closer to 1, or "
                    "centered=False"
                )

    def _extra_tensors(self, group: dict[str, Any], p: torch.Tensor) -> list[torch.Tensor]:
        return second_moment_tensors(group, p)

    def _update_group(self, group: dict[str, Any], hp: dict[str, Any], foreach: bool) -> None:
        momentum = hp["momentum"]
        self._carry_momentum(group, momentum)
        params = [p for p in group["params"] if p.grad is not None]
        if self._step_fused(group, hp, params):
            return
        per_example = group["second_moment"] == "per_example"
        m2 = (
            [
                per_example_second_moment(p, p.grad, hp["weight_decay"], hp["maximize"])
                for p in params
            ]
            if per_example
            else None
        )
        square_avgs, grad_avgs, bufs = [], [], []
        for p in params:
            st = self.state[p]
            if len(st) == 0 or "square_avg" not in st:
                st["step"] = torch.zeros((), dtype=scalar_dtype())
                st["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if momentum > 0 and "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if hp["centered"] and "grad_avg" not in st:
                st["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            square_avgs.append(st["square_avg"])
            grad_avgs.append(st.get("grad_avg"))
            bufs.append(st.get("momentum_buffer"))
        kwargs = dict(
            lr=hp["lr"],
            alpha=hp["alpha"],
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            momentum=momentum,
            centered=hp["centered"],
            maximize=hp["maximize"],
            power=hp["power"],
            eps_placement=hp["eps_placement"],
        )
        if not foreach:
            rmsprop_reference(
                params, [p.grad for p in params], square_avgs, grad_avgs, bufs, m2, **kwargs
            )
            return
        for idx in group_indices(params):
            rmsprop_foreach(
                [params[i] for i in idx],
                [params[i].grad for i in idx],
                [square_avgs[i] for i in idx],
                [grad_avgs[i] for i in idx],
                [bufs[i] for i in idx],
                [m2[i] for i in idx] if m2 is not None else None,
                **kwargs,
            )
