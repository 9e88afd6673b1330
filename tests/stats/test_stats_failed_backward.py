"""A backward pass that raises (in a tensor hook, in a custom Function's backward, in anomaly
mode's NaN check, a KeyboardInterrupt from a hook) writes no statistic, leaves none that a
per-example optimizer step could take for its gradient's, and the passes after it are exact.

Oracle: the brute-force per-example loop in float64 (rel. error <= 1e-10), for the statistics
and the per-example norms; with and without activation checkpointing (the failure inside the
checkpointed region)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from stats_brute import per_example_grads, rel_err
from torch import nn
from torch.utils.checkpoint import checkpoint

import sgdlab
from sgdlab import stats

DT = torch.float64


class Boom(torch.autograd.Function):
    """The identity, whose backward raises."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom in backward")


def _raise(exc):
    def hook(g):
        raise exc

    return hook


def _hook(exc):
    def fail(t):
        if t.requires_grad:  # a reentrant checkpoint's first run is without grad
            t.register_hook(_raise(exc))
        return t

    return fail


def _nan(t):
    return t + (t * 0).sqrt()  # d sqrt at 0 is inf, times 0: NaN in MulBackward0


# failure -> (function applied to a hidden activation, exception, its message, anomaly mode)
FAILURES = {
    "tensor hook": (_hook(ZeroDivisionError("in a hook")), ZeroDivisionError, "in a hook", False),
    "function": (Boom.apply, RuntimeError, "boom in backward", False),
    "anomaly": (_nan, RuntimeError, "returned nan values", True),
    "interrupt": (_hook(KeyboardInterrupt()), KeyboardInterrupt, None, False),
}


class Net(nn.Module):
    """Linear, a (checkpointed) region of Linear and tanh where a failure may be put, and a
    head; ``at_loss`` puts it on the output instead, before any tracked module's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "none"
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.fail = None
        self.at_loss = False

    def region(self, z):
        h = torch.tanh(self.b(z))
        return self.fail(h) if self.fail is not None and not self.at_loss else h

    def forward(self, x):
        h = self.a(x)
        if self.mode == "none":
            h = self.region(h)
        else:
            h = checkpoint(self.region, h, use_reentrant=self.mode == "reentrant")
        out = self.head(h)
        return self.fail(out) if self.fail is not None and self.at_loss else out


def _loss(out, y):
    return ((out - y) ** 2).sum(1).mean()


def _check_exact(net, tracker, x, y):
    mode, net.mode = net.mode, "none"
    with tracker.paused():
        per = per_example_grads(net, lambda o, t: ((o - t) ** 2).sum(), x, y)
    net.mode = mode
    for (name, p), g in zip(net.named_parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, g.pow(2).mean(0)) <= 1e-10, name
    norms = sum(g.pow(2).flatten(1).sum(1) for g in per)
    assert rel_err(tracker.per_example_sq_norms(), norms) <= 1e-10


@pytest.mark.parametrize("mode", ["none", "non-reentrant", "reentrant"])
@pytest.mark.parametrize("failure", [*FAILURES, "at the loss"])
def test_a_failed_backward_writes_nothing_and_the_next_passes_are_exact(mode, failure):
    torch.manual_seed(0)
    net = Net().to(DT)
    net.mode = mode
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    tracker = stats.track(net, per_example_norms=True)
    opt = sgdlab.Adam(net.parameters(), lr=1e-3, second_moment="per_example")
    _loss(net(x), y).backward()  # statistics of an earlier step, which must not be reused
    _check_exact(net, tracker, x, y)

    fn, exc, match, anomaly = FAILURES["function" if failure == "at the loss" else failure]
    net.fail, net.at_loss = fn, failure == "at the loss"
    net.zero_grad()
    with pytest.raises(exc, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode's notice and its forward traceback
        with torch.autograd.detect_anomaly() if anomaly else contextlib.nullcontext():
            _loss(net(x), y).backward()
    net.fail = None
    written = [p for p in net.parameters() if p.grad is not None]
    assert failure == "at the loss" or written  # the head's gradient, before the failure
    for p in written:  # no parameter with a gradient keeps a statistic
        assert getattr(p, "grad_second_moment", None) is None
    if written:
        with pytest.raises(ValueError, match="needs p.grad_second_moment"):
            opt.step()
        # a pass that adds to those gradients leaves them without a statistic
        _loss(net(x), y).backward()
        for p in written:
            assert getattr(p, "grad_second_moment", None) is None

    for _ in range(2):  # once the gradients are cleared, every pass is exact
        net.zero_grad()
        x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
        _loss(net(x), y).backward()
        _check_exact(net, tracker, x, y)
    tracker.detach()


def test_a_failed_pass_before_any_statistic_leaves_the_tracker_clean():
    """The first pass fails (the coverage check has not run yet), with gradients accumulated
    in place (``zero_grad(set_to_none=False)`` restarts them)."""
    torch.manual_seed(1)
    net = Net().to(DT)
    x, y = torch.randn(4, 4, dtype=DT), torch.randn(4, 2, dtype=DT)
    tracker = stats.track(net, per_example_norms=True)
    net.fail = _hook(ZeroDivisionError("in a hook"))
    with pytest.raises(ZeroDivisionError):
        _loss(net(x), y).backward()
    net.fail = None
    with pytest.raises(ValueError, match="no backward pass"):
        tracker.per_example_sq_norms()
    net.zero_grad(set_to_none=False)
    _loss(net(x), y).backward()
    _check_exact(net, tracker, x, y)
    tracker.detach()
