"""Parametrized modules (``torch.nn.utils.parametrize``): weight norm, spectral norm and
orthogonal weights take the fallback, which differentiates through the parametrization; their
statistics are those of the parameters the optimizer steps (``parametrizations.weight.
original0``...), against the brute-force per-example loop in float64.

Spectral norm in training mode runs one power iteration per forward call, so the oracle restores
the buffers before each example's forward: every example then sees the power-iteration vectors
the batch's forward pass used."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from stats_brute import assert_statistics
from torch import nn
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm
from torch.utils.checkpoint import checkpoint

import sgdlab.stats as stats

B = 5


class Net(nn.Module):
    """A parametrized convolution and linear layer between plain ones; ``twice`` calls the
    parametrized linear layer twice in one pass."""

    def __init__(self, wrap, twice: bool = False) -> None:
        super().__init__()
        self.conv = wrap(nn.Conv1d(2, 3, 3, padding=1))
        self.fc = wrap(nn.Linear(12, 6))
        self.head = nn.Linear(6, 3)
        self.twice = twice

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        h = torch.tanh(self.fc(h))
        if self.twice:
            h = h + torch.tanh(self.fc(h.repeat(1, 2)))
        return self.head(h)


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _per_example(model, x, y, buffers):
    """Per-example gradients, each from the buffers as they were before the batch's pass."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for b in range(B):
        for buf, value in zip(model.buffers(), buffers, strict=True):
            buf.copy_(value)
        rows.append(torch.autograd.grad(_loss(model(x[b : b + 1]), y[b : b + 1]), params))
    return [torch.stack(r) for r in zip(*rows, strict=True)]


WRAPS = {
    "weight_norm": weight_norm,
    "spectral_norm": spectral_norm,
    "orthogonal": lambda m: orthogonal(m) if isinstance(m, nn.Linear) else weight_norm(m),
}


# torch.func has no batching rule for orthogonal's tril_ (a performance note, not an error)
@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", list(WRAPS))
def test_parametrized_modules_match_per_example_loop(kind, reduction, training, twice):
    torch.manual_seed(3)
    model = Net(WRAPS[kind], twice).double().train(training)
    x, y = torch.randn(B, 2, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    start = [b.clone() for b in model.buffers()]
    per = _per_example(model, x, y, start)
    for buf, value in zip(model.buffers(), start, strict=True):
        buf.copy_(value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = stats.track(model, reduction=reduction, per_example_norms=True)
    assert any("conv (ParametrizedConv1d)" in str(w.message) for w in caught)
    total = _loss(model(x), y)
    (total / B if reduction == "mean" else total).backward()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("parametrizations.weight.original" in n for n, _ in named)
    assert_statistics(model, per, tracker)
    tracker.detach()


def test_tracking_leaves_spectral_norm_buffers_as_an_untracked_pass_does():
    """The statistics are computed with the parametrizations in eval mode: no extra power
    iteration, so the buffers (and the next step's sigma) are those of an untracked run, and
    the parametrizations are back in training mode afterwards."""
    torch.manual_seed(4)
    plain = Net(spectral_norm).double()
    tracked = Net(spectral_norm).double()
    tracked.load_state_dict(plain.state_dict())
    x, y = torch.randn(B, 2, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(tracked)
    for _ in range(2):
        for model in (plain, tracked):
            model.zero_grad()
            _loss(model(x), y).backward()
    for (name, a), b in zip(plain.named_buffers(), tracked.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    assert all(m.training for m in tracked.modules())
    tracker.detach()


def test_parametrized_module_under_activation_checkpointing():
    """The saved-tensor path (non-reentrant checkpointing) gives the statistics of the
    un-checkpointed pass."""
    torch.manual_seed(5)
    model = Net(weight_norm).double()
    x, y = torch.randn(B, 2, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model)
    _loss(model(x), y).div(B).backward()
    want = [p.grad_second_moment.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _loss(checkpoint(model, x, use_reentrant=False), y).div(B).backward()
    for p, w in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad_second_moment, w, rtol=1e-12, atol=0)
    tracker.detach()


def test_copies_of_a_tracked_parametrized_model_are_not_tracked():
    """A deep copy (EMA, teacher) gets inert forward and pre-forward hooks."""
    import copy

    model = Net(spectral_norm).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model)
    twin = copy.deepcopy(model)
    x, y = torch.randn(B, 2, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    _loss(twin(x), y).backward()
    assert all(getattr(p, "grad_second_moment", None) is None for p in model.parameters())
    assert all(getattr(p, "grad_second_moment", None) is None for p in twin.parameters())
    tracker.detach()
    assert not model.fc._forward_pre_hooks and not model.fc._forward_hooks


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_hook_based_reparametrizations_are_refused_with_their_replacement(kind):
    """The deprecated hook-based versions set the weight as a plain attribute before each
    call; the error names the module and the supported replacement, and leaves no hooks."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(torch.nn.utils, kind)(model[1])
    with pytest.raises(
        ValueError,
        match=rf"'1' uses the hook-based torch.nn.utils.{kind}.*"
        rf"torch.nn.utils.parametrizations.{kind}",
    ):
        stats.track(model)
    assert not model[0]._forward_hooks
