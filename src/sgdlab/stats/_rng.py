"""Replaying a call's random draws (dropout inside attention, between recurrent layers and in
fallback modules).

A rule that reruns a module with active dropout needs the masks of the forward pass. As
activation checkpointing does (``torch.utils.checkpoint``, ``preserve_rng_state``), the tracker
records the generator states just before the call (:func:`state`), and the rule reruns the same
random operations on tensors of the same shapes from those states (:func:`replay`), which draws
the same masks, and checks that the generators end where the call left them (a call compiled by
``torch.compile`` draws with inductor's own generator: refused). The rerun happens inside a fork
of the generators, so the training run's own random stream is the same as without the tracker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["recorded", "replay", "restore", "state"]

RngState = tuple[torch.Tensor, torch.device, "torch.Tensor | None"]


def state(device: torch.device) -> RngState:
    """The CPU generator's state and, for an accelerator ``device``, its generator's state."""
    if device.type in ("cpu", "meta"):  # meta tensors draw nothing
        return torch.get_rng_state(), device, None
    module = torch.get_device_module(device.type)
    return torch.get_rng_state(), device, module.get_rng_state(device)


def restore(saved: RngState) -> None:
    """Set the generators to the states ``saved`` (no fork)."""
    cpu, device, accel = saved
    torch.set_rng_state(cpu)
    if accel is not None:
        torch.get_device_module(device.type).set_rng_state(accel, device)


def recorded(before: RngState | None) -> tuple[RngState, RngState] | None:
    """``(before, now)``: the states before a call and after it (taken now), for
    :func:`replay`."""
    return None if before is None else (before, state(before[1]))


@contextlib.contextmanager
def replay(saved: tuple[RngState, RngState], what: str) -> Iterator[None]:
    """Run the body from the generator states before the call, ``saved[0]``; check that it
    left the generators where the call left them, ``saved[1]`` (so it drew what the call drew);
    restore the current states after."""
    before, after = saved
    _, device, accel = before
    devices = [] if accel is None else [device]
    kind = None if accel is None else device.type
    with torch.random.fork_rng(devices=devices, device_type=kind or "cuda"):
        restore(before)
        yield
        now = state(device)
        if not all(
            a is b or torch.equal(a, b) for a, b in ((now[0], after[0]), (now[2], after[2]))
        ):
            raise RuntimeError(
                f"sgdlab.stats: rerunning {what} to redraw its dropout masks did not draw what "
                "the forward pass drew (torch.compile, or a hook drawing random numbers?): keep "
                "it out of torch.compile while tracked, or set its dropout to 0"
            )
