"""Shared types of the augmented backward: one module call seen by a layer rule.

A *rule* turns the saved inputs of one module call and the gradient of the loss with respect to
that call's outputs into per-example statistics of the module's parameters. For an example b
let ``v_b`` be the part of the parameter gradient that flows through example b's slice of the
output gradient (so ``p.grad`` receives ``sum_b v_b`` from this call). A rule returns, for each
parameter, either

* ``moment = sum_b v_b * v_b`` (and optionally ``sq_norms[b] = ||v_b||^2``), the cheap form,
  valid when this call is the parameter's only use in the backward pass; or
* ``per_example = stack_b v_b`` (shape ``[B, *p.shape]``), needed when the parameter is used
  several times (weight tying, a module called twice), because per-example gradients must be
  summed over uses before they are squared; or, for a weight whose per-example gradient is an
  outer product (a linear map, a recurrent cell), ``factors = (dz, u)`` with
  ``v_b = sum_t dz_bt u_bt^T`` (``dz`` ``[B, T, rows]`` or ``[B, rows]``, ``u`` likewise with
  ``cols``): the tracker concatenates the factors of all uses along ``t`` and forms each
  example's sum over uses with one batched product (:func:`outer_moments`), instead of one
  ``[B, rows, cols]`` tensor per use; or, for a lookup table, ``rows = (example, row, vec)``:
  example ``example[i]``'s gradient has ``vec[i]`` in row ``row[i]`` and zeros elsewhere (an
  embedding's per-example gradient touches the rows of its tokens only, so a tied embedding
  never needs a ``[B, vocabulary, dim]`` tensor).

The tracker turns ``v_b`` into the gradient ``g_b`` of example b's loss (``g_b = N v_b`` for a
mean-reduced loss over N examples, ``g_b = v_b`` for a summed loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Call",
    "Contribution",
    "chunk_size",
    "outer_moments",
    "outer_per_example",
    "reduce_per_example",
    "row_moments",
    "row_sums",
    "require_batched",
    "small_per_example",
    "in_dtype",
    "in_param_dtype",
    "scaled_ones",
    "square_sum",
    "unread",
    "without_grad",
]


@dataclass(slots=True)
class Call:
    """One call of a tracked module, ready for its rule.

    ``grads`` holds the gradient of the loss for each differentiable output of the call, in the
    order of ``torch.utils._pytree.tree_leaves(output)`` restricted to tensors requiring grad;
    ``None`` where an output received no gradient.
    """

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grads: tuple[Tensor | None, ...]
    batch_size: int
    param_names: tuple[str, ...]
    materialize: frozenset[str]
    norms: bool
    memory_budget: int
    conv_strategy: str = "auto"
    scale: float = 1.0
    out_spec: Any = None
    out_positions: tuple[int, ...] = ()
    # buffers the call's forward pass changed, as it left them (a parametrized module's
    # spectral-norm vectors), by name relative to the module; ``None``: none changed
    buffers: dict[str, Tensor] | None = None
    # generator states just before and just after the call (:mod:`sgdlab.stats._rng`), for a
    # rule that reruns the call's dropout; ``None``: none recorded (no active dropout)
    rng: Any = None
    # the call's differentiable outputs (detached, in the order of ``grads``) with their
    # versions when the call returned them, for a rule that checks its rerun against them (the
    # fallback; an output changed in place since is not compared); ``None``: not kept
    outputs: tuple[tuple[Tensor, int], ...] | None = None


@dataclass(slots=True)
class Contribution:
    """Per-example statistic of one parameter from one call (see the module docstring).

    ``moment`` is already multiplied by ``Call.scale`` (the factor that turns sum_b v_b^2 into
    this call's share of the second moment, set by the tracker from the loss reduction), so
    rules can fold it into a kernel they launch anyway; ``per_example`` and ``sq_norms`` are
    not scaled."""

    moment: Tensor | None = None
    per_example: Tensor | None = None
    sq_norms: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    factors: tuple[Tensor, Tensor] | None = None
    rows: tuple[Tensor, Tensor, Tensor] | None = None


def chunk_size(batch_size: int, bytes_per_example: int, memory_budget: int) -> int:
    """Examples per chunk so that one chunk of per-example tensors fits ``memory_budget``."""
    per = max(1, int(bytes_per_example))
    return max(1, min(batch_size, memory_budget // per))


def reduce_per_example(
    name: str,
    call: Call,
    shape: torch.Size,
    like: Tensor,
    make: Callable[[slice], Tensor],
    extra_bytes_per_example: int = 0,
) -> Contribution:
    """Build per-example gradients ``v_b`` in batch chunks and reduce them.

    ``make(slice)`` returns ``v_b`` for the examples of the slice, shape ``[n, *shape]`` or
    flattened to ``[n, prod(shape)]`` (a fresh buffer: it is squared in place). When the
    parameter must be materialised (``name in call.materialize``) the chunks are concatenated;
    otherwise each chunk is squared and summed at once, so at most one chunk of per-example
    gradients exists at a time (its size set by ``call.memory_budget``;
    ``extra_bytes_per_example`` counts temporaries that ``make`` allocates per example).
    """
    B = call.batch_size
    numel = 1
    for s in shape:
        numel *= int(s)
    n = chunk_size(B, numel * like.element_size() + extra_bytes_per_example, call.memory_budget)
    if name in call.materialize:
        parts = [make(slice(i, min(B, i + n))) for i in range(0, B, n)]
        whole = torch.cat(parts) if len(parts) > 1 else parts[0]
        return Contribution(per_example=whole.reshape(B, *shape))
    # sum_b scale * v_b^2 as one matrix-vector product per chunk (squares summed over the
    # chunk's examples and scaled in the same kernel, accumulated in place after the first)
    flat: Tensor | None = None
    norms = [] if call.norms else None
    for i in range(0, B, n):
        v = make(slice(i, min(B, i + n)))
        sq = v.mul_(v)  # v is a fresh buffer: square in place
        if sq.dim() != 2:
            sq = sq.reshape(sq.shape[0], -1)
        ones = scaled_ones(sq.shape[0], call.scale, sq)
        flat = torch.mv(sq.T, ones) if flat is None else flat.addmv_(sq.T, ones)
        if norms is not None:
            norms.append(sq.sum(1))
    assert flat is not None  # B >= 1
    return Contribution(
        moment=flat.view(shape), sq_norms=torch.cat(norms) if norms is not None else None
    )


def outer_moments(
    factors: list[tuple[Tensor, Tensor]],
    shape: torch.Size,
    scale: float,
    memory_budget: int,
    norms: bool,
    batch_size: int,
    rows: list[tuple[Tensor, Tensor, Tensor]] = (),
) -> tuple[Tensor, Tensor | None]:
    """``scale * sum_b G_b^2`` (and ``||G_b||^2`` with ``norms``) for per-example gradients
    ``G_b = sum_t dz_bt u_bt^T + (rows of b)`` over all uses' factors ``(dz, u)`` and sparse
    ``rows`` (see the module docstring): the factors are concatenated along ``t`` and ``G_b`` is
    formed by one batched matrix product per chunk of examples under ``memory_budget``, the
    rows of the chunk's examples added into it (the others masked to zero: no host read)."""
    if not factors:
        return _row_moments(rows, shape, scale, norms, batch_size)
    dz = torch.cat([d if d.dim() == 3 else d[:, None] for d, _ in factors], 1)
    u = torch.cat([a if a.dim() == 3 else a[:, None] for _, a in factors], 1)
    B, R, C = dz.shape[0], dz.shape[2], u.shape[2]
    if rows:
        key = torch.cat([ex * R + row for ex, row, _ in rows])
        vec = torch.cat([v.reshape(v.shape[0], C) for _, _, v in rows])
    n = chunk_size(B, R * C * dz.element_size(), memory_budget)
    flat: Tensor | None = None
    parts = []
    for i in range(0, B, n):
        g = torch.bmm(dz[i : i + n].transpose(1, 2), u[i : i + n])
        if rows:
            m = g.shape[0]
            local = key - i * R
            inside = (local >= 0) & (local < m * R)
            g.view(m * R, C).index_add_(
                0, local.clamp(0, m * R - 1), vec * inside.unsqueeze(1).to(vec.dtype)
            )
        g = g.view(-1, R * C)
        g.mul_(g)
        ones = scaled_ones(g.shape[0], scale, g)
        flat = torch.mv(g.T, ones) if flat is None else flat.addmv_(g.T, ones)
        if norms:
            parts.append(g.sum(1))
    assert flat is not None  # B >= 1
    return flat.view(shape), torch.cat(parts) if norms else None


def _row_moments(
    rows: list[tuple[Tensor, Tensor, Tensor]],
    shape: torch.Size,
    scale: float,
    norms: bool,
    batch_size: int,
) -> tuple[Tensor, Tensor | None]:
    """:func:`outer_moments` without factors: the rows of all uses, summed per (example, row)
    and squared (:func:`row_sums`, :func:`row_moments`)."""
    R = shape[0]
    key = torch.cat([ex * R + row for ex, row, _ in rows])
    width = math.prod(shape[1:])  # explicit: a batch without lookups has zero rows
    vec = torch.cat([v.reshape(v.shape[0], width) for _, _, v in rows])
    moment, nb = row_moments(*row_sums(key, vec), R, scale, norms, batch_size)
    return moment.view(shape), nb


def row_sums(key: Tensor, vec: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of the vectors ``vec[j]`` of equal keys ``key[j] = example * R + row``: ``(key of
    each segment, its sum)``. The keys are sorted and runs of equal keys summed; the shapes are
    those of the input (unused segments keep key 0 and a zero sum, which adds nothing), so a GPU
    never waits for a host read."""
    key, order = torch.sort(key)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    seg = torch.cumsum(first, 0) - 1
    agg = vec.new_zeros(vec.shape).index_add_(0, seg, vec[order])
    return torch.zeros_like(key).scatter_(0, seg, key), agg


def row_moments(
    seg_key: Tensor, agg: Tensor, R: int, scale: float, norms: bool, batch_size: int
) -> tuple[Tensor, Tensor | None]:
    """``scale * sum_b G_b^2`` (``[R, cols]``) and, with ``norms``, ``||G_b||^2`` for
    per-example gradients given by their rows (:func:`row_sums`; ``agg`` is squared in
    place)."""
    sq = agg.mul_(agg)
    moment = agg.new_zeros(R, agg.shape[1]).index_add_(0, seg_key % R, sq, alpha=scale)
    nb = None
    if norms:
        nb = agg.new_zeros(batch_size).index_add_(
            0, torch.div(seg_key, R, rounding_mode="floor"), sq.sum(1)
        )
    return moment, nb


def outer_per_example(factors: tuple[Tensor, Tensor]) -> Tensor:
    """``[B, rows, cols]`` per-example gradients ``sum_t dz_bt u_bt^T`` of one use's factors."""
    dz, u = factors
    if dz.dim() == 2:
        return dz[:, :, None] * u[:, None, :]
    return torch.bmm(dz.transpose(1, 2), u)


def small_per_example(name: str, call: Call, v: Tensor) -> Contribution:
    """Reduce per-example gradients ``v`` ([B, *shape]) that are cheap to hold whole."""
    if name in call.materialize:
        return Contribution(per_example=v)
    sq = v * v
    if v.dim() != 2:
        sq = sq.reshape(v.shape[0], -1)
    norms = sq.sum(1) if call.norms else None
    moment = torch.mv(sq.T, scaled_ones(sq.shape[0], call.scale, sq))
    return Contribution(moment=moment if v.dim() == 2 else moment.view(v.shape[1:]), sq_norms=norms)


_CACHE: dict[tuple, Tensor] = {}


def scaled_ones(n: int, scale: float, like: Tensor) -> Tensor:
    """A cached vector of ``n`` entries equal to ``scale`` (turns a column sum and a scaling
    into one matrix-vector product)."""
    key = (n, scale, like.dtype, like.device)
    v = _CACHE.get(key)
    if v is None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        v = _CACHE[key] = torch.full((n,), scale, dtype=like.dtype, device=like.device)
    return v


def square_sum(v: Tensor, scale: float) -> Tensor:
    """``scale * sum_b v_b * v_b`` for per-example values ``v`` ``[B, n]``, a fresh buffer that
    is squared in place: two kernels (the square, and the sum over examples with the scaling as
    one matrix-vector product)."""
    v.mul_(v)
    return torch.mv(v.T, scaled_ones(v.shape[0], scale, v))


class ChunkSums:
    """Per-example gradients arriving in chunks of examples (the fallback, registered rules):
    for each parameter, ``Call.scale`` times the sum of their squares and the per-example
    squared norms, or, for a parameter in ``Call.materialize``, the chunks themselves."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.kept: dict[str, list[Tensor]] = {}
        self.moments: dict[str, Tensor] = {}
        self.norms: dict[str, list[Tensor]] = {}

    def add(self, name: str, v: Tensor) -> None:
        """Per-example gradients ``v`` ``[n, *shape]`` of the next chunk's examples."""
        if name in self.call.materialize:
            self.kept.setdefault(name, []).append(v)
            return
        sq = (v * v).reshape(v.shape[0], -1)
        part = torch.mv(sq.T, scaled_ones(sq.shape[0], self.call.scale, sq))
        prev = self.moments.get(name)
        self.moments[name] = part if prev is None else prev.add_(part)
        if self.call.norms:
            self.norms.setdefault(name, []).append(sq.sum(1))

    def contributions(self, shapes: dict[str, torch.Size]) -> dict[str, Contribution]:
        """One contribution per parameter added, of shape ``shapes[name]``."""
        out = {nm: Contribution(per_example=torch.cat(vs)) for nm, vs in self.kept.items()}
        for nm, m in self.moments.items():
            out[nm] = Contribution(
                moment=m.view(shapes[nm]),
                sq_norms=torch.cat(self.norms[nm]) if self.call.norms else None,
            )
        return out


def unread(like: Tensor) -> Tensor:
    """A cached 0-dim tensor for the ``input`` of ``addmm(..., beta=0)``, which is never read."""
    key = ("unread", like.dtype, like.device)
    v = _CACHE.get(key)
    if v is None:
        v = _CACHE[key] = torch.empty((), dtype=like.dtype, device=like.device)
    return v


def in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in the parameter's dtype (mixed precision: activations and output gradients in
    half precision, statistics accumulated in the parameter's precision)."""
    return t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


def in_param_dtype(module: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """A call's input and output gradient in the dtype of ``module.weight`` (:func:`in_dtype`;
    the common case, both already in it, without a call)."""
    dtype = module.weight.dtype
    if x.dtype is not dtype:
        x = in_dtype(x, dtype)
    if d.dtype is not dtype:
        d = in_dtype(d, dtype)
    return x, d


def require_batched(module: nn.Module, x: Tensor, min_dim: int, what: str) -> None:
    """Raise when a module input lacks the leading batch dimension."""
    if x.dim() < min_dim:
        raise ValueError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-example "
            f"statistics need a batch dimension first ({what})"
        )


def without_grad(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` outside autograd: rules run inside backward passes, which record a graph
    only under ``create_graph=True`` (checked first, so that the usual pass enters no
    context)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args)
    return fn(*args)
