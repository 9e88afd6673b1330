r"""What an optimizer hands the fused path: a :class:`FusedKernel`.

An optimizer with a fused path defines, in its own file, one subclass of :class:`FusedKernel`:
the flat state it keeps (:attr:`~FusedKernel.buffers`, :meth:`~FusedKernel.keys`), its scalar
vector (:attr:`~FusedKernel.scalars`, filled each step by :meth:`~FusedKernel.values`, the
scalar rule), the structural options that select a compiled variant
(:meth:`~FusedKernel.options`) and the update itself (:meth:`~FusedKernel.function`): a pure
function of flat tensors and the scalar vector, called as::

    fn(param, grad, *buffers, m2, master, sc, *extra)

``buffers`` in the order of :attr:`~FusedKernel.buffers` (``None`` for those the step does not
keep), ``m2`` the flat per-example second moments (or ``None``), ``master`` the float32 master
copy of bfloat16/float16 parameters (or ``None``), ``sc`` the scalar vector, ``extra`` what
:meth:`~FusedKernel.extra_args` returns (device-side counters of capturable steps). Every value
that changes from step to step enters through ``sc``, so a new learning rate never recompiles.

:func:`get_kernel` compiles a variant once with ``torch.compile`` (inductor: C++ on CPU, Triton
on CUDA) and caches it for the process; each variant gets its own code object, so dynamo's
per-code recompile limit is never shared between variants, and ``dynamic=True`` lets one
compiled kernel serve buffers of every length.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sgdlab.optim._fast.flat import FlatGroup

__all__ = ["FusedKernel", "get_kernel", "pack_scalars", "write_param"]

Options = tuple[tuple[str, Any], ...]


class FusedKernel:
    """One algorithm's fused step; subclass it beside the optimizer (see the module docstring).

    Class attributes: ``name`` (for compile records and kernel names), ``scalars`` (the layout
    of the scalar vector), ``buffers`` (every flat state entry the kernel may take, in its
    argument order) and ``counts_steps`` (whether each parameter's ``state["step"]`` is kept,
    advanced by one per step)."""

    name: str = ""
    scalars: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    counts_steps: bool = False

    def index(self) -> dict[str, int]:
        """Position of each name in the scalar vector."""
        return {k: i for i, k in enumerate(self.scalars)}

    def keys(self, hp: dict[str, Any]) -> dict[str, str]:
        """The state entries this step keeps, each with how a missing one starts: ``"zeros"``,
        or ``"kernel"`` (written in full by the first step)."""
        raise NotImplementedError

    def options(self, hp: dict[str, Any], fg: FlatGroup) -> Options:
        """The structural options of this step (each distinct tuple is one compiled variant)."""
        raise NotImplementedError

    def function(self, opts: Options) -> Callable[..., None]:
        """The plain (uncompiled) kernel for ``opts``."""
        raise NotImplementedError

    def values(self, hp: dict[str, Any], fg: FlatGroup) -> dict[str, float]:
        """The scalar rule: the scalar vector's values for this step (names absent are 0).
        Called once per flat group and step, before the kernel; may advance host-side
        counters."""
        raise NotImplementedError

    def accepts(self, state: dict, params: list[torch.Tensor]) -> bool:
        """Whether the step can run fused on ``params`` as their state stands (checked before
        any buffer is built; ``False`` sends the group to the foreach path)."""
        return True

    def adopt(self, fg: FlatGroup) -> bool:
        """Prepare a flat group's kernel-owned host state (``fg.host``) after it is built or
        reused; ``False`` declines the fused step (nothing changed yet)."""
        return True

    def extra_args(self, hp: dict[str, Any], fg: FlatGroup) -> tuple:
        """Arguments after ``sc`` (capturable steps: device-side counters)."""
        return ()

    def sync(self, fg: FlatGroup) -> None:
        """Write device-side counters of ``fg`` back into the optimizer state (before
        ``state_dict`` and before the flat buffers are dropped)."""


def write_param(p: torch.Tensor, master: torch.Tensor | None, x: torch.Tensor) -> None:
    """Store the new parameter ``x``: into the master copy and, rounded, into ``p``; or into
    ``p`` when there is no master."""
    if master is not None:
        master.copy_(x)
        p.copy_(x.to(p.dtype))
    else:
        p.copy_(x)


def pack_scalars(
    kernel: FusedKernel, values: dict[str, float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The scalar vector of ``kernel`` (missing names are 0) as a tensor on ``device``."""
    return torch.tensor([float(values.get(k, 0.0)) for k in kernel.scalars], dtype=dtype).to(device)


def _own_code(fn: Callable[..., None], name: str) -> Callable[..., None]:
    """A copy of ``fn`` with its own code object (dynamo's caches and recompile limits are per
    code object, so each variant gets its own)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@functools.cache
def get_kernel(kernel: FusedKernel, opts: Options, compiled: bool) -> Callable[..., None]:
    """The kernel of ``kernel``/``opts``: ``torch.compile``-d (cached for the process; inductor
    also keeps its generated code on disk between processes) or the plain function."""
    fn = kernel.function(opts)
    if not compiled:
        return fn
    tag = "_".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in opts)
    fn = _own_code(fn, f"sgdlab_{kernel.name}_{tag}")
    # The thread count is part of the code inductor generates for the CPU (its OpenMP
    # loops) but not of its on-disk cache key unless set: without it, a kernel compiled by a
    # process with one thread (a data-loader worker, torch.set_num_threads(1)) ran on one
    # thread in every later process, about 2x slower on 2 cores.
    options: dict[str, Any] = {"cpp.threads": torch.get_num_threads()}
    return torch.compile(fn, dynamic=True, fullgraph=True, options=options)
