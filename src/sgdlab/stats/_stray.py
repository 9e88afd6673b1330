"""First-pass check: a tracked parameter used outside the calls of the module that owns it.

The rules see a parameter only through the calls of its module. A model that also uses it
directly (an output head written ``logits = h @ self.embed.weight.T`` instead of an
``nn.Linear`` sharing the weight) sends it gradient the statistics do not contain, and since
the module's calls do contribute, the first-pass coverage check (every parameter that gets a
gradient got a statistic) cannot see it. So the first forward pass with grad enabled of the
tracked model runs under :class:`Watch`, a torch-function mode that follows which tracked
module call is running (pre- and post-hooks) and, for every operation taking a tracked
parameter outside a call of a module that owns it, puts a hook on the operation's output. A
hook that fires in the backward pass (the use reached the loss; a use for logging does not)
records the use, and the tracker refuses the pass. The hooks are removed with the first-pass
checks, so later steps pay nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Watch", "check_coverage"]


def _tensors(args: tuple, kwargs: dict) -> list[Any]:
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            found.extend(a)
        else:
            found.append(a)
    return found


class Watch(TorchFunctionMode):
    """The watch over one forward pass of ``root`` (see the module docstring).

    ``owners`` maps ``id(parameter)`` to ``(name, modules whose calls may use it)``.
    ``hook`` wraps each hook function before it is registered (the tracker's deep-copy-safe
    wrapper). ``used`` collects ``(parameter name, operation)`` of uses that reached the loss.
    """

    def __init__(
        self, root: nn.Module, owners: dict[int, tuple[str, set[nn.Module]]], hook: Any
    ) -> None:
        super().__init__()
        self.owners = owners
        self.stack: list[nn.Module] = []
        self.used: list[tuple[str, str]] = []
        self.done = False
        self.active = False
        modules = {m for _, ms in owners.values() for m in ms}
        self.handles = [
            root.register_forward_pre_hook(hook(self._start), prepend=True),
            root.register_forward_hook(hook(self._stop), always_call=True),
        ]
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(hook(self._push)))
            self.handles.append(m.register_forward_hook(hook(self._pop), always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _start(self, module: nn.Module, args: tuple) -> None:
        if self.active or self.done or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        self.stack = []
        self.active = True
        self.__enter__()

    def _stop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.active:
            return
        self.__exit__(None, None, None)
        self.active = False
        # a forward pass that raised (output None) watched nothing complete: watch the next;
        # the hooks stay until the tracker removes them (not while torch iterates over them)
        self.done = output is not None

    def _push(self, module: nn.Module, args: tuple) -> None:
        if self.active:
            self.stack.append(module)

    def _pop(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.active and self.stack and self.stack[-1] is module:
            self.stack.pop()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        inner = self.stack[-1] if self.stack else None
        for t in _tensors(args, kwargs):
            owner = self.owners.get(id(t)) if isinstance(t, Tensor) else None
            if owner is not None and inner not in owner[1]:
                self._watch(out, owner[0], getattr(func, "__name__", repr(func)))
        return out

    def _watch(self, out: Any, name: str, op: str) -> None:
        outs = out if isinstance(out, (list, tuple)) else (out,)
        for o in outs:
            if isinstance(o, Tensor) and o.requires_grad:
                o.register_hook(lambda g, name=name, op=op: self.used.append((name, op)))


def check_coverage(watch: Watch, missing: list[str]) -> None:
    """The first-pass checks, then ``watch`` removed: refuse ``missing``, the parameters whose
    gradient bypassed a call of their module, and else the uses ``watch`` saw reach the loss."""
    stray = sorted({f"{name} ({op})" for name, op in watch.used})
    watch.remove()
    if stray and not missing:
        raise ValueError(
            f"parameters used outside a call of their module reached the loss: "
            f"{', '.join(stray)}; those uses are not tracked: use the module (a tied head: an "
            "nn.Linear whose weight is the embedding's), or a module that owns the parameter"
        )
    if missing:
        raise RuntimeError(
            f"parameters {missing} received gradients that did not pass through a call of "
            "their module (used directly in the forward of another module?); their "
            "per-example statistics are unknown. Wrap the computation that uses them in a "
            "module that owns them"
        )
