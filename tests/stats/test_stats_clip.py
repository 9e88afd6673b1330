"""``sgdlab.stats.clip_grad_norm_``: the clipped gradient and statistics are those of the loss
scaled by the clipping factor (oracle: the tracker on ``c * loss``), the gradient is clipped
exactly as torch clips it, and a per-example Adam step after it equals the step on the scaled
loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sgdlab
import sgdlab.stats as stats


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _loss(model):
    torch.manual_seed(1)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("max_norm", [1e-2, 1e3], ids=["clipping", "not-clipping"])
def test_clipped_statistics_are_those_of_the_scaled_loss(max_norm):
    model, twin, reference = _model(), _model(), _model()
    for m in (model, twin, reference):
        stats.track(m)
    _loss(model).backward()
    total = stats.clip_grad_norm_(model.parameters(), max_norm)
    _loss(reference).backward()  # torch's clipping of the same gradient
    torch.testing.assert_close(
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm), total, rtol=0, atol=0
    )
    factor = min(1.0, max_norm / (float(total) + 1e-6))
    (factor * _loss(twin)).backward()
    for p, q, r in zip(model.parameters(), twin.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=0, atol=0)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)
        torch.testing.assert_close(p.grad_second_moment, q.grad_second_moment, rtol=1e-12, atol=0)
    if max_norm < 1:  # torch's clipping leaves the statistics unscaled: they differ
        ratio = r.grad_second_moment / p.grad_second_moment
        assert float(ratio.min()) > 10


def test_adam_step_after_clipping_equals_the_step_on_the_scaled_loss():
    model, twin = _model(), _model()
    opts = []
    for m in (model, twin):
        stats.track(m)
        opts.append(sgdlab.Adam(m.parameters(), lr=1e-2, second_moment="per_example"))
    _loss(model).backward()
    total = stats.clip_grad_norm_(model.parameters(), 0.05)
    (min(1.0, 0.05 / (float(total) + 1e-6)) * _loss(twin)).backward()
    for opt in opts:
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_parameters_without_statistics_and_bad_max_norm():
    """Untracked parameters are clipped like torch's (no statistic to scale); a single tensor
    is accepted; a max_norm that is not finite and positive is refused by name."""
    model = _model()
    stats.track(model[0])
    _loss(model).backward()
    before = model[0].weight.grad_second_moment.clone()
    total = stats.clip_grad_norm_(model.parameters(), 0.01)
    assert not hasattr(model[2].weight, "grad_second_moment")
    factor = 0.01 / (float(total) + 1e-6)
    torch.testing.assert_close(model[0].weight.grad_second_moment, before * factor**2)
    stats.clip_grad_norm_(model[2].weight, 0.001)
    assert float(model[2].weight.grad.norm()) == pytest.approx(0.001, rel=1e-3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_norm"):
            stats.clip_grad_norm_(model.parameters(), bad)
