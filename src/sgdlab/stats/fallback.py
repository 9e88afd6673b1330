"""Fallback rule for any other module with parameters: ``torch.func``.

For a module f with parameters theta, input x and output gradient d, example b's gradient is the
vector-Jacobian product ``v_b = grad_theta <f(theta, x_b), d_b>``. The fallback evaluates it
with ``torch.func.functional_call`` and ``vmap(grad(...))`` over chunks of examples (each
example keeps a batch axis of size one, so modules that require batched inputs work). It reruns
the module's forward and backward once per chunk, so it is exact for every module whose output
for example b depends only on example b's inputs, and slower than the dedicated rules; the
tracker warns which modules take it.

Tensors among the call's arguments whose leading dimension equals the batch size are split per
example, also inside tuples, lists and dicts (a recurrent state ``(h, c)``); others (masks
shared by all examples, flags) are passed whole. The rule checks its own assumptions on every call
(:class:`_RerunCheck`): each example's rerun must give the batched call's output for that
example, to rounding; a module that couples the examples, a shared argument whose first
dimension equals the batch size by chance, or a random draw not laid out along the batch fails
the check with a clear error instead of giving wrong statistics. A forward pass that changes
the module's buffers (a running mean) is refused by the tracker before the rule runs.

``nn.MultiheadAttention`` configurations without a dedicated rule (see
:mod:`sgdlab.stats.attention`) come here; with ``batch_first=False`` they take the batch
from dimension 1 of ``query``, ``key``, ``value``.
Dropout inside the module (``nn.Dropout`` and its kin, ``F.dropout`` calls) and random draws of
the default generator (stochastic depth, noise) apply the forward pass's masks and draws to each
example (:mod:`sgdlab.stats._dropout_masks`); dropout inside fused kernels (attention,
multi-layer recurrent modules) and draws that cannot be split per example are refused.

Parametrized modules (``torch.nn.utils.parametrize``: weight norm, spectral norm, orthogonal)
come here with the parameters the parametrization computes from (``parametrizations.weight.
original0`` ...): ``functional_call`` recomputes the parametrized tensor from them, so ``grad``
differentiates through the parametrization. The recomputation runs the parametrizations in eval
mode, with their buffers as the call's forward pass left them (``Call.buffers``): spectral
norm's power iteration is not repeated, and sigma is the one the forward pass used.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _rng
from ._base import Call, ChunkSums, Contribution, chunk_size
from ._dropout_masks import Capture, NeedMasks, Probe, Substitute, batch_axes
from ._registry import Rule, register

__all__ = ["fallback_rule", "check_fallback", "fallback_batch_size", "fallback_params"]


def fallback_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters a fallback module is responsible for.

    Its direct parameters; for ``nn.MultiheadAttention`` also those of ``out_proj``, which the
    attention uses without calling the submodule; for a parametrized module also those its
    parametrizations compute from (``parametrizations.<tensor>.original``...).
    """
    return [(n, p) for n, p in _owned(module) if p.requires_grad]


def _owned(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    if isinstance(module, nn.MultiheadAttention):
        return list(module.named_parameters())
    named = list(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        named += module.parametrizations.named_parameters(prefix="parametrizations")
    return named


@contextlib.contextmanager
def _parametrizations_in_eval(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s parametrizations in eval mode (no power iteration), then restore."""
    if not parametrize.is_parametrized(module):
        yield
        return
    subs = list(module.parametrizations.modules())
    modes = [m.training for m in subs]
    try:
        for m in subs:
            m.training = False
        yield
    finally:
        for m, mode in zip(subs, modes, strict=True):
            m.training = mode


def check_fallback(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Refuse dropout drawn inside fused kernels, whose masks cannot be reproduced per example
    (``nn.Dropout`` and ``F.dropout`` calls can: :mod:`sgdlab.stats._dropout_masks`)."""
    for name, sub in module.named_modules():
        if not sub.training:
            continue
        if isinstance(sub, nn.MultiheadAttention) and sub.dropout > 0:
            where = f" ({name})" if name else ""
            raise ValueError(
                f"MultiheadAttention{where} has dropout={sub.dropout} in training mode inside "
                f"{type(module).__name__}, which takes the per-example fallback; its random "
                "attention mask cannot be reproduced per example: use dropout=0 or eval mode"
            )
        if isinstance(sub, nn.RNNBase) and sub.dropout > 0 and sub.num_layers > 1:
            raise ValueError(
                f"{type(sub).__name__} ({name or 'itself'}) has dropout={sub.dropout} between "
                f"layers inside {type(module).__name__}, which takes the per-example fallback; "
                "its masks cannot be reproduced per example: use dropout=0 there"
            )


def _batch_dims(module: nn.Module, args: tuple, kwargs: dict, B: int) -> list[int | None]:
    """The batch dimension of each leaf of ``tree_flatten((args, kwargs))`` (``None``: passed
    whole)."""
    mha_seq_first = isinstance(module, nn.MultiheadAttention) and not module.batch_first

    def dim_of(name: str | int, t: Any) -> int | None:
        if not isinstance(t, Tensor) or t.dim() == 0:
            return None
        if mha_seq_first and name in (0, 1, 2, "query", "key", "value"):
            return 1
        if isinstance(module, nn.MultiheadAttention) and name in ("attn_mask", 5):
            if t.dim() == 3:
                raise ValueError(
                    "MultiheadAttention with a per-example 3-D attn_mask is not supported by "
                    "the per-example fallback; pass a 2-D mask or key_padding_mask"
                )
            return None
        return 0 if t.shape[0] == B else None

    # one entry per leaf of tree_flatten((args, kwargs)), named by its top-level argument
    dims: list[int | None] = []
    for name, value in [*enumerate(args), *kwargs.items()]:
        dims += [dim_of(name, leaf) for leaf in tree_flatten(value)[0]]
    return dims


def fallback_batch_size(module: nn.Module, args: tuple, kwargs: dict) -> int:
    x = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise ValueError(
            f"{type(module).__name__}: the per-example fallback needs a batched tensor as the "
            f"first argument, got {type(x).__name__}"
        )
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return int(x.shape[1])
    return int(x.shape[0])


def _guarded(module: nn.Module, per_example: Any, *args: Any) -> Any:
    """``per_example(*args)``, with vmap's refusal of a random draw explained."""
    try:
        return per_example(*args)
    except RuntimeError as e:
        if "randomness" not in str(e):
            raise
        raise ValueError(
            f"{type(module).__name__} takes the per-example fallback and draws random numbers "
            "in a way that cannot be replayed per example (dropout, rand/randn/bernoulli and "
            f"random fills can; randperm, multinomial and the like cannot): {e}"
        ) from None


# largest difference of the rerun's outputs from the batched call's, relative to the largest
# output, that passes (rounding of other summation orders, TF32 products on GPUs)
_RERUN_RTOL = {torch.float64: 1e-6, torch.float32: 1e-2}


class _RerunCheck:
    """The fallback's own check: each example's rerun (:func:`fallback_rule`) must give the
    batched call's output for that example. It does not where the module couples the examples
    (statistics over the batch), where an argument shared by all examples has a first
    dimension equal to the batch size by chance (it is split), or where a random draw is not
    laid out along the batch. Differences are gathered on the device and read once."""

    def __init__(self, call: Call, live: list[int], out_dims: tuple[int, ...]) -> None:
        self.call = call
        kept = [] if call.outputs is None else [call.outputs[j] for j in live]
        # outputs modified in place after the call (an in-place activation) are not compared
        self.outputs = [o if o._version == v else None for o, v in kept] or None
        self.dims = out_dims
        self.ratios: list[Tensor] = []

    def add(self, s: slice, rerun: tuple[Tensor, ...]) -> None:
        """The rerun outputs of the examples ``s`` (``[n, *per-example shape]``)."""
        if self.outputs is None:
            return
        for o, r, d in zip(self.outputs, rerun, self.dims, strict=True):
            if o is None:
                continue
            want = o.narrow(d, s.start, s.stop - s.start)
            got = r.squeeze(d + 1).movedim(0, d) if r.dim() == o.dim() + 1 else r
            if got.shape != want.shape:
                self._fail(f"an output of shape {tuple(got.shape)} instead of {tuple(want.shape)}")
            got = got.to(want.dtype)
            same = (got == want) | (got.isnan() & want.isnan())
            diff = torch.where(same, 0.0, (got - want).abs()).nan_to_num(float("inf"))
            scale = o.abs().nan_to_num(0.0, 0.0, 0.0).amax().clamp_min(1e-30)
            self.ratios.append(diff.amax() / scale)

    def verify(self) -> None:
        if not self.ratios:
            return
        worst = float(torch.stack([r.float().cpu() for r in self.ratios]).max())
        dtype = next((o.dtype for o in self.outputs or () if o is not None), torch.float32)
        if not worst <= _RERUN_RTOL.get(dtype, 5e-2):
            self._fail(f"outputs that differ by {worst:.2g} relative to the largest output")

    def _fail(self, what: str) -> None:
        raise ValueError(
            f"{type(self.call.module).__name__} takes the per-example fallback, whose rerun of "
            f"one example at a time gave {what}. Causes: an output depends on other examples; "
            "a shared argument's first dimension equal to the batch size; a draw not per "
            "example. Else give it a rule (sgdlab.stats.register_rule)"
        )


def _dropout_maps(
    call: Call,
    module: nn.Module,
    theta: tuple[Tensor, ...],
    names: tuple[str, ...],
    buffers: dict[str, Tensor],
) -> list[tuple[Tensor, ...]]:
    """The affine maps of the call's active dropout calls, from a rerun of the batched call
    from the generator states recorded before it (refused when none were recorded)."""
    if call.rng is None:
        raise ValueError(
            f"{type(call.module).__name__} takes the per-example fallback and draws random "
            "numbers (dropout, noise), but was called in eval mode or without grad mode, when "
            "the tracker does not record the random generator: make its draws follow "
            "self.training (as nn.Dropout does), or call it in training mode"
        )
    capture = Capture(call.rng[0][1])
    redraw = _rng.replay(call.rng, type(module).__name__)
    with torch.no_grad(), _parametrizations_in_eval(module), redraw, capture:
        functional_call(
            module,
            {**buffers, **dict(zip(names, theta, strict=True))},
            tuple(call.args),
            dict(call.kwargs),
        )
    return capture.maps


def _probe(
    module: nn.Module,
    theta: tuple[Tensor, ...],
    names: tuple[str, ...],
    buffers: dict[str, Tensor],
    leaves: list,
    in_spec: Any,
) -> list[torch.Size]:
    """The shapes of the random draws and dropout inputs of one example's call (``leaves``:
    its inputs, batch axes of size one), eager, in a fork of the generators."""
    args, kwargs = tree_unflatten(leaves, in_spec)
    probe = Probe()
    devices = [t.device for t in theta if t.device.type != "cpu"]
    with (
        torch.no_grad(),
        _parametrizations_in_eval(module),
        torch.random.fork_rng(devices=devices[:1]),
        probe,
    ):
        functional_call(module, {**buffers, **dict(zip(names, theta, strict=True))}, args, kwargs)
    return probe.shapes


def fallback_rule(call: Call) -> dict[str, Contribution]:
    """Per-example statistics of a module's parameters by ``vmap(grad(functional_call))``."""
    module = call.module
    B = call.batch_size
    names = call.param_names
    params = dict(_owned(module))
    theta = tuple(params[n].detach() for n in names)
    buffers = dict(call.buffers or {})
    leaves_in, in_spec = tree_flatten((tuple(call.args), dict(call.kwargs)))
    dims = _batch_dims(module, call.args, call.kwargs, B)
    positions = call.out_positions
    live = [i for i, g in enumerate(call.grads) if g is not None]
    if not live or not names:
        return {}
    seq_first = isinstance(module, nn.MultiheadAttention) and not module.batch_first
    out_dims = tuple(1 if seq_first and positions[j] == 0 else 0 for j in live)

    def one(
        captured: bool, theta_: tuple[Tensor, ...], leaves_: list, cot_: tuple, maps_: list
    ) -> Tensor:
        a, k = tree_unflatten(
            [x.unsqueeze(d) if d is not None else x for x, d in zip(leaves_, dims, strict=True)],
            in_spec,
        )
        # the masks and draws of this example (a batch axis of size one, as its inputs)
        kept = [
            tuple(t if d is None else t.unsqueeze(d) for t, d in zip(m, md, strict=True))
            for m, md in zip(maps_, map_dims, strict=True)
        ]
        with Substitute(kept if captured else None, type(module).__name__):
            out = functional_call(
                module, {**buffers, **dict(zip(names, theta_, strict=True))}, a, k
            )
        leaves, _ = tree_flatten(out)
        total = theta_[0].new_zeros(())
        for j, c, d in zip(live, cot_, out_dims, strict=True):
            total = total + (leaves[positions[j]] * c.unsqueeze(d)).sum()
        return total, tuple(leaves[positions[j]] for j in live)

    numel = sum(t.numel() for t in theta)
    n = chunk_size(B, 4 * numel * theta[0].element_size(), call.memory_budget)

    def cut(x: Any, d: int | None, s: slice) -> Any:
        if d is None:
            return x.detach() if isinstance(x, Tensor) else x
        return x.detach().narrow(d, s.start, s.stop - s.start)

    # without dropout masks first; a module that turns out to draw some raises NeedMasks, and
    # the chunks are computed again with the masks of the batched call
    maps: list[tuple[Tensor, ...]] | None = None
    map_dims: list[tuple[int | None, ...]] = []
    while True:
        per_example = vmap(
            grad(functools.partial(one, maps is not None), has_aux=True),
            in_dims=(None, dims, out_dims, map_dims),
            randomness="error",
        )
        sums = ChunkSums(call)
        check = _RerunCheck(call, live, out_dims)
        try:
            with torch.enable_grad(), _parametrizations_in_eval(module):
                for i in range(0, B, n):
                    s = slice(i, min(B, i + n))
                    a = [cut(x, d, s) for x, d in zip(leaves_in, dims, strict=True)]
                    c = tuple(cut(call.grads[j], d, s) for j, d in zip(live, out_dims, strict=True))
                    ms = [
                        tuple(cut(t, d, s) for t, d in zip(m, md, strict=True))
                        for m, md in zip(maps or [], map_dims, strict=True)
                    ]
                    vs, rerun = _guarded(module, per_example, theta, a, c, ms)
                    check.add(s, rerun)
                    for nm, v in zip(names, vs, strict=True):
                        sums.add(nm, v)
        except NeedMasks:
            maps = _dropout_maps(call, module, theta, names, buffers)
            first = [cut(x, d, slice(0, 1)) for x, d in zip(leaves_in, dims, strict=True)]
            map_dims = batch_axes(
                maps,
                _probe(module, theta, names, buffers, first, in_spec),
                B,
                type(module).__name__,
            )
            continue
        break
    check.verify()
    return sums.contributions({nm: t.shape for nm, t in zip(names, theta, strict=True)})


# the rule of every module that no other rule takes
register(
    nn.Module,
    Rule(
        fallback_rule,
        batch_size=fallback_batch_size,
        check=check_fallback,
        params=fallback_params,
        dropout=lambda module: True,
        is_fallback=True,
    ),
)
