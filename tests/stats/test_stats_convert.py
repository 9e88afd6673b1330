"""replace_batchnorm: BatchNorm swapped for GroupNorm, so that a vision model can be tracked.

Oracles: the GroupNorm module's output equals F.group_norm with the copied affine parameters;
the tracked converted model matches the brute-force per-example loop in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats_brute import per_example_grads, rel_err
from torch import nn

from sgdlab import stats


def _net():
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4, affine=False)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
        nn.BatchNorm1d(5),
        nn.Linear(5, 3),
    )


def test_every_batchnorm_becomes_a_groupnorm_with_its_affine_parameters():
    torch.manual_seed(0)
    net = _net().double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-1, 1)
    w, b = net[1].weight.clone(), net[1].bias.clone()
    net[7].weight.requires_grad_(False)
    out = stats.replace_batchnorm(net, num_groups=4)
    assert out is net
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    gn, inner, last = net[1], net[3][1], net[7]
    assert (gn.num_groups, gn.num_channels, gn.eps) == (2, 6, 1e-5)  # gcd(4, 6) = 2
    assert (inner.num_groups, inner.affine) == (4, False)
    assert last.num_groups == 1 and not last.weight.requires_grad and last.bias.requires_grad
    assert gn.weight.dtype == torch.float64
    torch.testing.assert_close(gn.weight, w, rtol=0, atol=0)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(gn(x), F.group_norm(x, 2, w, b, 1e-5), rtol=1e-12, atol=1e-12)


def test_a_batchnorm_model_is_refused_then_tracked_after_conversion():
    torch.manual_seed(1)
    net = _net().double()
    x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    with stats.track(net, warn_fallback=False):
        with pytest.raises(ValueError, match="replace_batchnorm"):
            net(x)
    # groups of several channels: with one channel per group the preceding conv bias has a zero
    # gradient (the normalisation removes any per-channel shift) and the test compares noise
    stats.replace_batchnorm(net, num_groups=2)

    def loss(out, t):
        return F.cross_entropy(out, t, reduction="sum")

    per = per_example_grads(net, loss, x, y)
    with stats.track(net, warn_fallback=False):
        (loss(net(x), y) / 5).backward()
        for p, g in zip(net.parameters(), per, strict=True):
            assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10


def test_a_bare_batchnorm_and_bad_num_groups():
    bn = nn.BatchNorm1d(8).eval()
    gn = stats.replace_batchnorm(bn, num_groups=3)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 1 and not gn.training
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="num_groups must be an integer >= 1"):
            stats.replace_batchnorm(nn.Sequential(nn.BatchNorm1d(4)), num_groups=bad)


def test_a_shared_batchnorm_becomes_one_shared_groupnorm_and_lazy_is_refused():
    """A BatchNorm held in two places becomes one GroupNorm held in both (the second place
    kept its BatchNorm: named_children lists a module once); an uninitialised lazy BatchNorm
    is refused (it became GroupNorm(g, 0), failing at the next forward pass)."""
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.uniform_()
    model = nn.Sequential(bn, nn.Linear(4, 4), bn)
    stats.replace_batchnorm(model, num_groups=2)
    assert isinstance(model[0], nn.GroupNorm) and model[0] is model[2]
    assert torch.equal(model[0].weight, bn.weight)
    assert sum(p.numel() for p in model.parameters()) == 8 + 20
    with pytest.raises(ValueError, match="has not seen an input"):
        stats.replace_batchnorm(nn.Sequential(nn.LazyBatchNorm1d()))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        stats.replace_batchnorm(None)


def test_track_refuses_option_values_that_would_be_misread():
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="per_example_norms must be True or False"):
        stats.track(lin, per_example_norms="False")
    with pytest.raises(TypeError, match="warn_fallback"):
        stats.track(lin, warn_fallback="x")
    for bad in (0.5, 0, True, "8"):
        with pytest.raises(ValueError, match="memory_budget"):
            stats.track(lin, memory_budget=bad)
    stats.track(lin, memory_budget=2e8).detach()
