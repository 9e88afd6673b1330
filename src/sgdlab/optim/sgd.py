r"""SGD with momentum written as the lecture's running average.

The lecture's momentum ("Momentum", "An equivalent formulation of momentum")::

    v_t   = (1 - 1/N_g) v_{t-1} + eta * g_hat_t,        Phi_{t+1} = Phi_t - v_t
          = N_g eta mu_t,  mu_t = (1 - 1/N_g) mu_{t-1} + (1/N_g) g_hat_t   (mu_0 = 0)

is torch.optim.SGD with ``lr = eta``, ``momentum = 1 - 1/N_g`` and ``dampening = 0``: torch's
buffer ``b_t = momentum * b_{t-1} + g_hat_t`` (``b_1 = g_hat_1``) is ``v_t / eta = N_g mu_t``.
All three forms give the same iterates (REFERENCE.md "Momentum forms"; tested in float64).
Conjugacy: with ``eta = eta' / N_g`` the step per unit of averaged gradient ``mu`` is ``eta'``
whatever ``N_g`` (the lecture's "Solving for eta").

When the batch size changes between steps and the scaling rule changes ``N_g``, the average
``mu`` is what carries over: the buffer (``N_g mu``) is multiplied by ``N_g(new) / N_g(old)``
(``(1 - m_old) / (1 - m_new)``) before the step. Loss assumed: mean over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from sgdlab import hyper as _hyper
from sgdlab._validation import check_horizon, check_positive
from sgdlab.optim._base import BatchScaledOptimizer, check_hyper, check_torch_only_flags
from sgdlab.optim._common import group_indices
from sgdlab.optim._fast import FlatGroup, FusedKernel, write_param

__all__ = ["SGD", "SGDKernel", "sgd_reference", "sgd_foreach"]


def sgd_reference(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One SGD step, tensor by tensor (the readable reference). ``bufs`` is updated in place
    (``None`` entries are replaced by new buffers)."""
    for i, p in enumerate(params):
        g = grads[i] if not maximize else -grads[i]
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = bufs[i]
            if buf is None:
                buf = torch.clone(g).detach()
                bufs[i] = buf
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)


def sgd_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    bufs: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """:func:`sgd_reference` with torch's multi-tensor (foreach) kernels; same arithmetic.
    All tensors must share device and dtype."""
    if not params:
        return
    g = torch._foreach_neg(grads) if maximize else list(grads)
    if weight_decay != 0:
        if maximize:
            torch._foreach_add_(g, params, alpha=weight_decay)
        else:
            g = torch._foreach_add(g, params, alpha=weight_decay)
    if momentum != 0:
        fresh = [i for i, b in enumerate(bufs) if b is None]
        old = [i for i, b in enumerate(bufs) if b is not None]
        if old:
            ob = [b for b in bufs if b is not None]
            torch._foreach_mul_(ob, momentum)
            torch._foreach_add_(ob, [g[i] for i in old], alpha=1 - dampening)
        for i in fresh:
            bufs[i] = torch.clone(g[i]).detach()
        full = [b for b in bufs if b is not None]  # every buffer exists now
        g = list(torch._foreach_add(g, full, alpha=momentum)) if nesterov else full
    torch._foreach_add_(params, g, alpha=-lr)


class SGDKernel(FusedKernel):
    """SGD's fused step: :func:`sgd_reference` on one flat buffer. The momentum buffer starts
    as the first gradient (``"kernel"``: written in full by the first step)."""

    name = "sgd"
    scalars = ("wd", "momentum", "one_minus_dampening", "neg_lr")
    buffers = ("momentum_buffer",)

    def keys(self, hp: dict[str, Any]) -> dict[str, str]:
        return {"momentum_buffer": "kernel"} if hp["momentum"] != 0 else {}

    def options(self, hp: dict[str, Any], fg: FlatGroup) -> tuple[tuple[str, Any], ...]:
        opts: tuple[tuple[str, Any], ...] = (
            ("maximize", bool(hp["maximize"])),
            ("weight_decay", hp["weight_decay"] != 0),
            ("momentum", hp["momentum"] != 0),
            ("init_buffer", bool(fg.fresh.get("momentum_buffer", False))),
            ("nesterov", bool(hp["nesterov"])),
        )
        return opts + ((("capturable", True),) if hp.get("capturable") else ())

    def values(self, hp: dict[str, Any], fg: FlatGroup) -> dict[str, float]:
        return dict(
            wd=hp["weight_decay"],
            momentum=hp["momentum"],
            one_minus_dampening=1 - hp["dampening"],
            neg_lr=-hp["lr"],
        )

    def function(self, opts: tuple[tuple[str, Any], ...]) -> Callable[..., None]:
        o, ix = dict(opts), self.index()

        def sgd(p, g, buf, m2, master, sc):
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
            write_param(p, master, x + sc[ix["neg_lr"]] * d)

        return sgd


class SGD(BatchScaledOptimizer):
    r"""Stochastic gradient descent with (heavy-ball or Nesterov) momentum.

    A drop-in replacement for :class:`torch.optim.SGD`: with default options it performs the
    same arithmetic (identical in float64). On top of it, hyperparameters tuned at
    ``ref_batch_size`` move to the current ``batch_size`` by a scaling rule of
    :mod:`sgdlab.hyper` (``"linear"`` by default: ``lr x B/B0``, momentum unchanged, Goyal et
    al. 2017; ``"lecture"``: ``lr = B eta' / N_g``, ``N_g = max(1, N'_g / B)``; ``"exact"``:
    ``momentum_B = momentum^(B/B0)``; ``"sqrt"``).

    Args:
        params: parameters or param groups.
        lr: learning rate eta per step (>= 0).
        momentum: ``1 - 1/N_g`` (0 <= momentum < 1).
        dampening: as torch (scales the gradient's entry into the buffer by ``1 - dampening``).
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        maximize: maximize the objective.
        batch_size: batch size B of the coming steps (changeable by :meth:`set_batch_size`
            or ``step(batch_size=B)``).
        ref_batch_size: batch size B0 at which ``lr``/``momentum`` were tuned.
        scaling: ``"linear"`` (default), ``"lecture"``, ``"exact"`` or ``"sqrt"``.
        foreach: ``True`` for the multi-tensor path, ``False`` for the per-tensor reference,
            ``None`` to choose (foreach on accelerators, as torch).
        nonfinite: ``"raise"`` (default) on NaN/inf gradients naming the parameter,
            ``"skip"`` to skip the step leaving parameters and state untouched, ``"ignore"``.
        fused: ``True`` for the fused path (:mod:`sgdlab.optim._fast`): parameters, gradients
            and state in flat buffers per (group, device, dtype), one compiled kernel each,
            float32 state and master weights for bfloat16/float16 parameters. Opt-in
            (``None``/``False``: the foreach or reference path).
        differentiable: accepted for compatibility with torch.optim at its default ``False``
            (``True`` raises: autograd through the step is not implemented).

    Example:
        >>> import torch, sgdlab
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = sgdlab.SGD(model.parameters(), lr=0.1, momentum=0.9, ref_batch_size=32)
        >>> model(torch.randn(64, 3)).pow(2).mean().backward()
        >>> opt.step(batch_size=64)   # lr 0.2 for this and later steps (linear rule)
    """

    _momentum_form = "heavy_ball"
    _torch_name = "SGD"
    _state_keys = {"momentum_buffer": "param", "master_param": "param"}
    _state_required = ()
    _group_required = ("lr", "momentum", "dampening", "weight_decay")
    _fused_kernel = SGDKernel()

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        batch_size: int | None = None,
        ref_batch_size: int | None = None,
        scaling: str | None = None,
        foreach: bool | None = None,
        nonfinite: str = "raise",
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        check_torch_only_flags("SGD", differentiable=differentiable)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(
            params,
            defaults,
            batch_size=batch_size,
            ref_batch_size=ref_batch_size,
            scaling=scaling,
            default_scaling="linear",
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )

    @classmethod
    def from_conjugate(
        cls,
        params: Iterable[Any],
        eta_prime: float,
        n_g: float = 1.0,
        *,
        batch_size: int = 1,
        scaling: str = "lecture",
        **kwargs: Any,
    ) -> SGD:
        """Build from the lecture's conjugate units: per-example learning rate ``eta'`` and
        momentum horizon ``N'_g`` in examples, at batch size ``B``.

        ``lr = B eta' / N_g``, ``momentum = 1 - 1/N_g`` with ``N_g = max(1, N'_g / B)``
        (``scaling="lecture"``) or the ``exact``/``sqrt``/``linear`` rule; later batch-size
        changes follow the same rule.
        """
        check_positive("eta_prime", eta_prime)
        check_horizon("n_g", n_g)
        step = _hyper.to_per_step(
            _hyper.Conjugate(eta_prime=eta_prime, n_g=n_g), batch_size, scaling, "heavy_ball"
        )
        return cls(
            params,
            lr=step.lr,
            momentum=step.beta1,
            batch_size=batch_size,
            ref_batch_size=batch_size,
            scaling=scaling,
            **kwargs,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_hyper(group, "lr")
        m = check_hyper(group, "momentum", below_one=True)
        d = check_hyper(group, "dampening", at_most_one=True)
        check_hyper(group, "weight_decay")
        if group["nesterov"] and (m <= 0 or d != 0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening = 0, got momentum="
                f"{group['momentum']!r}, dampening={group['dampening']!r}"
            )

    def _hyper_of(self, group: dict[str, Any]) -> _hyper.PerStep:
        return _hyper.PerStep(lr=group["lr"], beta1=group["momentum"])

    def _with_hyper(self, group: dict[str, Any], step: _hyper.PerStep) -> dict[str, Any]:
        return {"lr": step.lr, "momentum": step.beta1}

    def _update_group(self, group: dict[str, Any], hp: dict[str, Any], foreach: bool) -> None:
        momentum = hp["momentum"]
        self._carry_momentum(group, momentum)
        params = [p for p in group["params"] if p.grad is not None]
        if self._step_fused(group, hp, params):
            return
        if any(p.grad.is_sparse for p in params):
            foreach = False
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        kwargs = dict(
            lr=hp["lr"],
            momentum=momentum,
            dampening=hp["dampening"],
            weight_decay=hp["weight_decay"],
            nesterov=hp["nesterov"],
            maximize=hp["maximize"],
        )
        if foreach:
            for idx in group_indices(params):
                sub = [bufs[i] for i in idx]
                sgd_foreach([params[i] for i in idx], [params[i].grad for i in idx], sub, **kwargs)
                for j, i in enumerate(idx):
                    bufs[i] = sub[j]
        else:
            sgd_reference(params, [p.grad for p in params], bufs, **kwargs)
        if momentum != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf
