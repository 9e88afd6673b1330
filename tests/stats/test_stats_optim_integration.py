"""The optimizers read what the tracker writes: one step with ``track`` equals one step with
``p.grad_second_moment`` set from the brute-force per-example loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats_brute import per_example_grads
from torch import nn

import sgdlab
import sgdlab.stats as stats


def loss_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: sgdlab.RMSProp(ps, lr=1e-2, second_moment="per_example"),
        lambda ps: sgdlab.Adam(ps, lr=1e-2, second_moment="per_example"),
    ],
    ids=["rmsprop", "adam"],
)
def test_step_with_tracker_equals_step_with_brute_force_moments(make_opt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()
    twin = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(7, 2, 6, dtype=torch.float64), torch.randint(0, 4, (7,))
    per = per_example_grads(twin, loss_sum, x, y)
    for p, g in zip(twin.parameters(), per, strict=True):
        p.grad = g.mean(0)
        p.grad_second_moment = (g * g).mean(0)
    make_opt(twin.parameters()).step()

    stats.track(model)
    opt = make_opt(model.parameters())
    opt.zero_grad()
    (loss_sum(model(x), y) / 7).backward()
    opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_optimizer_refuses_a_missing_second_moment():
    lin = nn.Linear(3, 2)
    opt = sgdlab.RMSProp(lin.parameters(), second_moment="per_example")
    lin(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="grad_second_moment"):
        opt.step()


def test_unfreezing_after_attaching_names_the_remedy():
    """A tracker tracks the parameters that require grad when it is attached; a parameter
    unfrozen later has a gradient but no statistic: the per-example optimizer says so, and
    attaching again tracks it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    tracker = stats.track(model)
    opt = sgdlab.Adam(model.parameters(), lr=1e-3, second_moment="per_example")
    x = torch.randn(5, 3)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    model[0].weight.requires_grad_(True)
    model(x).square().mean().backward()
    with pytest.raises(ValueError, match=r"shape \(4, 3\) has none.*attach it again"):
        opt.step()
    tracker.detach()
    opt.zero_grad()
    with stats.track(model):
        model(x).square().mean().backward()
        assert model[0].weight.grad_second_moment.shape == (4, 3)
        opt.step()
