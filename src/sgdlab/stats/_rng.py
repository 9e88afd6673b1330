"""Replaying a call's random draws (the attention dropout of ``nn.MultiheadAttention``).

A rule that reruns a module with active dropout needs the masks of the forward pass. As
activation checkpointing does (``torch.utils.checkpoint``, ``preserve_rng_state``), the tracker
records the generator states just before the call (:func:`state`), and the rule reruns the same
random operations on tensors of the same shapes from those states (:func:`replay`), which draws
the same masks. The rerun happens inside a fork of the generators, so the training run's own
random stream is the same as without the tracker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["replay", "restore", "state"]

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


@contextlib.contextmanager
def replay(saved: RngState) -> Iterator[None]:
    """Run the body from the generator states ``saved``; restore the current states after."""
    _, device, accel = saved
    devices = [] if accel is None else [device]
    kind = None if accel is None else device.type
    with torch.random.fork_rng(devices=devices, device_type=kind or "cuda"):
        restore(saved)
        yield
