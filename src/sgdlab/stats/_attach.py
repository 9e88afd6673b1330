"""What the tracker reads from a model when it attaches: the modules that see ``[T, B, ...]``
inputs, the owner of each parameter, hook-based reparametrizations it refuses; the forward hook
type a copy of a tracked module does not inherit; which tracker holds each module and parameter
(one tracker each: two would add every statistic twice)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ._registry import Rule

__all__ = [
    "Hook",
    "attached",
    "inert_hook",
    "innermost",
    "refuse_hook_reparametrization",
    "refuse_tracked",
    "register",
    "seq_first_modules",
    "tracker_of",
    "unregister",
]

# the tracker attached to each tracked module (while its hooks are on): a second tracker on the
# same module would add every statistic twice when gradients accumulate
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()

# id of each tracked parameter -> (the parameter, its tracker), weakly: a parameter shared by
# modules of two trackers (a head tied to an embedding) would get two statistics added
_TRACKED: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def tracker_of(p: Tensor) -> Any:
    """The attached tracker that tracks parameter ``p``, or None."""
    found = _TRACKED.get(id(p))
    if found is None or found[0]() is not p:
        return None
    tracker = found[1]()
    return tracker if tracker is not None and tracker._handles else None


def attached(module: nn.Module) -> Any:
    """The attached tracker that tracks ``module``, or None."""
    ref = _ATTACHED.get(module)
    tracker = ref() if ref is not None else None
    return tracker if tracker is not None and tracker._handles else None


def refuse_tracked(model: nn.Module) -> None:
    """Refuse a model one of whose modules another attached tracker tracks."""
    for name, module in model.named_modules():
        if attached(module) is not None:
            raise ValueError(
                f"module {name or type(module).__name__!r} is already tracked by another "
                "Tracker (both would add their statistics to grad_second_moment): detach "
                "that one first (tracker.detach()), or use it instead of a new one (e.g. "
                "sgdlab.distributed.DataParallel(..., tracker=tracker))"
            )


def register(tracker: Any, modules: Iterable[nn.Module], params: dict[int, tuple]) -> None:
    """Record ``tracker`` as the one of ``modules`` and of ``params`` (id -> (name, p)); refuse
    a parameter another tracker tracks through a module that shares it."""
    for module in modules:
        _ATTACHED[module] = weakref.ref(tracker)
    for name, p in params.values():
        if tracker_of(p) not in (None, tracker):
            raise ValueError(
                f"parameter {name!r} is already tracked by another Tracker through a module "
                "that shares it (a head tied to an embedding): each would square only its "
                "own use and both would add to grad_second_moment. Track the modules that "
                "share it with one tracker (their common parent)"
            )
    for pid, (_, p) in params.items():
        _TRACKED[pid] = (weakref.ref(p), weakref.ref(tracker))


def unregister(tracker: Any, modules: Iterable[nn.Module], pids: Iterable[int]) -> None:
    """Forget ``tracker`` as the one of ``modules`` and of the parameters ``pids``."""
    for module in modules:
        ref = _ATTACHED.get(module)
        if ref is not None and ref() is tracker:
            del _ATTACHED[module]
    for pid in pids:
        found = _TRACKED.get(pid)
        if found is not None and found[1]() in (tracker, None):
            del _TRACKED[pid]


def inert_hook(module: nn.Module, *args: Any) -> None:
    """The forward (pre-)hook a copy of a tracked module gets: a copy is not tracked."""
    return None


class Hook(functools.partial):
    """A tracker's forward hook as registered on a module (called like the function it wraps,
    in C): a deep copy of the module (an EMA or teacher model) gets :func:`inert_hook`, not a
    hook that would record the copy's calls as the original's and write their statistics onto
    the original's parameters; pickling the module (``torch.save(model)``) is refused with a
    clear message rather than with the pickler's about a local function."""

    def __deepcopy__(self, memo: dict) -> Any:
        return inert_hook

    def __reduce__(self) -> Any:
        raise TypeError(
            "a module with an sgdlab.stats tracker attached cannot be pickled (its forward hooks "
            "belong to the running tracker): save model.state_dict(), or call tracker.detach() "
            "before torch.save(model)"
        )


def seq_first_modules(model: nn.Module) -> set[nn.Module]:
    """The modules inside torch's transformer modules built with ``batch_first=False`` (their
    feed-forward and norm layers see ``[T, B, d]``); their attention reads its own flag."""
    found: set[nn.Module] = set()
    for module in model.modules():
        layer = module
        if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
            layer = module.layers[0] if len(module.layers) else None
        if isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            seq_first = not layer.self_attn.batch_first
        elif isinstance(module, nn.Transformer):
            seq_first = not module.batch_first
        else:
            continue
        if seq_first:
            found.update(m for m in module.modules() if not isinstance(m, nn.MultiheadAttention))
    return found


def refuse_hook_reparametrization(name: str, module: nn.Module) -> None:
    """The hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` set the weight as a
    plain attribute in a forward pre-hook, out of reach of the rules and of the fallback; their
    ``torch.nn.utils.parametrizations`` versions compute the same weight and are supported."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            raise ValueError(
                f"module {name or type(module).__name__!r} uses the hook-based "
                f"torch.nn.utils.{kind}, whose weight is out of the tracker's reach: apply "
                f"torch.nn.utils.parametrizations.{kind} instead (the same reparametrization, "
                "supported)"
            )


def innermost(claims: list[tuple[str, nn.Module, Rule, list]]) -> list[tuple]:
    """The modules that own parameters, each with the parameters it is responsible for: a
    parameter that a module registers as its own and one of its submodules too (Opacus's
    DPRNN names its cells' weights ``weight_ih_l0``...; ``self.w = self.lin.weight``) is the
    innermost module's, whose calls use it; the outer module would differentiate through them
    again and count each use twice. A use of it in the outer module's own forward is then a
    use outside a call of its module (refused on the first pass). Modules left with no
    parameter are dropped."""
    holders: dict[int, list[str]] = {}
    for name, _, _, owned in claims:
        for _, p in owned:
            holders.setdefault(id(p), []).append(name)

    def inner(name: str, pid: int) -> bool:
        prefix = f"{name}." if name else ""
        return any(other != name and other.startswith(prefix) for other in holders[pid])

    out = []
    for name, module, rule, owned in claims:
        kept = [(n, p) for n, p in owned if not inner(name, id(p))]
        if kept:
            out.append((name, module, rule, kept))
    return out
