"""Refusals with messages that name the problem and the way out."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import sgdlab.stats as stats


def test_batchnorm_training_mode_is_refused_with_the_reason():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    stats.track(model)
    with pytest.raises(ValueError, match="whole batch.*GroupNorm.*eval"):
        model(torch.randn(4, 1, 5, 5))
    model.eval()
    model(torch.randn(4, 1, 5, 5)).sum().backward()
    assert model[1].weight.grad_second_moment.shape == (2,)


def test_batchnorm_without_running_stats_is_refused_in_eval():
    model = nn.BatchNorm1d(3, track_running_stats=False).eval()
    stats.track(model)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        model(torch.randn(4, 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction": "avg"}, "reduction"),
        ({"memory_budget": 0}, "memory_budget"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stats.track(nn.Linear(2, 2), **kwargs)


def test_not_a_module_and_nothing_to_track():
    with pytest.raises(TypeError, match="Module"):
        stats.track([nn.Parameter(torch.ones(2))])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        stats.track(frozen)


def test_scale_grad_by_freq_is_refused():
    emb = nn.Embedding(5, 2, scale_grad_by_freq=True)
    stats.track(emb)
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        emb(torch.tensor([[1, 2]]))


def test_parameter_used_outside_its_module_call():
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.head = nn.Linear(3, 1)

        def forward(self, x):
            return self.head(x @ self.lin.weight.T)  # uses lin's weight without calling lin

    model = Leaky()
    stats.track(model)
    with pytest.raises(RuntimeError, match="lin.weight.*did not pass through"):
        model(torch.randn(4, 3)).sum().backward()


class MatmulTiedLM(nn.Module):
    """An embedding whose weight is also the output head, used directly (``F.linear(h,
    emb.weight)``) rather than through a module; ``log`` reads a weight norm as a number."""

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.direct = direct

    def forward(self, idx):
        h = torch.tanh(self.lin(self.emb(idx)))
        self.logged = self.lin.weight.norm().item()  # a use that does not reach the loss
        with torch.no_grad():
            self.emb.weight.mul_(1.0)  # nor does an update without grad
        return F.linear(h, self.emb.weight) if self.direct else self.head(h)


@pytest.mark.parametrize("direct", [True, False], ids=["direct-use", "through-the-module"])
def test_parameter_also_used_outside_its_module_is_named(direct):
    """The embedding's own calls contribute, so the coverage check cannot see the direct use;
    the first forward pass watches uses outside the modules' calls, and those that reach the
    loss are refused (before: the statistics silently missed the head's part)."""
    model = MatmulTiedLM(direct)
    tracker = stats.track(model)
    idx = torch.randint(0, 10, (3, 5))
    if direct:
        with pytest.raises(ValueError, match=r"emb.weight \(linear\).*nn.Linear whose weight"):
            model(idx).square().mean().backward()
    else:
        for _ in range(2):
            model(idx).square().mean().backward()
        assert model.emb.weight.grad_second_moment.shape == (10, 4)
    tracker.detach()
    assert not model.emb._forward_pre_hooks and not model._forward_hooks


def test_inconsistent_batch_dimension_names_batch_first():
    model = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 2))  # GRU reads [T, B, in]
    stats.track(model)
    out, _ = model(torch.randn(5, 6, 3))
    with pytest.raises(ValueError, match="batch first"):
        out.sum().backward()


def test_use_across_separate_forward_passes_in_one_backward():
    lin, other = nn.Linear(3, 2), nn.Linear(3, 2)
    tracker = stats.track(nn.ModuleList([lin, other]))
    y1 = lin(torch.randn(4, 3))
    other(torch.randn(4, 3)).sum().backward()  # closes the forward pass of y1
    y2 = lin(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="several module calls"):
        (y1 + y2).sum().backward()
    tracker.detach()


def test_input_modified_in_place_is_detected():
    lin = nn.Linear(3, 2)
    lin.weight.requires_grad_(False)  # autograd then does not save the input itself
    stats.track(lin)
    x = torch.randn(4, 3)
    out = lin(x)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_unbatched_input():
    lin = nn.Linear(3, 2)
    stats.track(lin)
    with pytest.raises(ValueError, match="batch dimension"):
        lin(torch.randn(3)).sum().backward()


def test_recurrent_refusals():
    lstm = nn.LSTM(2, 3, num_layers=2, dropout=0.5, batch_first=True)
    stats.track(lstm)
    lstm(torch.randn(2, 4, 2))  # dropout between layers on the CPU: the masks are redrawn
    lstm(pack_padded_sequence(torch.randn(2, 4, 2), [4, 2], batch_first=True))
    meta = nn.LSTM(2, 3, num_layers=2, dropout=0.5, batch_first=True, device="meta")
    stats.track(meta)
    with pytest.raises(ValueError, match="dropout=0.5 between layers in training mode on meta"):
        meta(torch.randn(2, 4, 2, device="meta"))
    gru = nn.GRU(2, 3, batch_first=True)
    stats.track(gru)
    with pytest.raises(ValueError, match=r"shape \(4, 2\).*3 dimensions"):
        gru(torch.randn(4, 2))


def test_random_draws_a_fallback_cannot_reproduce_are_refused():
    """Dropout calls and draws of the default generator inside a fallback module are replayed
    (test_stats_fallback_dropout.py); a permutation, fused attention dropout and attention
    dropout without a rule are refused with the reason."""

    class Jitter(nn.Module):  # a random permutation of the features: not replayable
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return (x * self.w)[..., torch.randperm(4)]

    class FusedDrop(nn.Module):  # attention dropout inside the fused kernel
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x):
            q = (x * self.w).unsqueeze(1)
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.2).squeeze(1)

    for module, match in (
        (Jitter(), "cannot be replayed per example"),
        (FusedDrop(), "dropout_p > 0 inside a module on the per-example"),
    ):
        with pytest.warns(UserWarning, match="fallback"):
            stats.track(module)
        with pytest.raises(ValueError, match=match):
            module(torch.randn(2, 3, 4)).sum().backward()
    # attention dropout in a configuration that takes the fallback (add_bias_kv); the
    # dedicated rule replays it (tests/stats/test_stats_attention_dropout.py)
    attention = nn.MultiheadAttention(4, 2, dropout=0.1, add_bias_kv=True, batch_first=True)
    stats.track(attention)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="dropout=0.1 in training mode"):
        attention(x, x, x)


def test_norms_need_the_flag():
    lin = nn.Linear(3, 2)
    tracker = stats.track(lin)
    lin(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match="per_example_norms=True"):
        tracker.per_example_sq_norms()


def test_tracker_recovers_after_a_failed_backward():
    model = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 2))
    stats.track(model)
    out, _ = model(torch.randn(5, 6, 3))  # seq-first GRU: refused during backward
    with pytest.raises(ValueError, match="batch first"):
        out.sum().backward()
    model[1].batch_first = True
    x = torch.randn(6, 5, 3)
    out, _ = model(x)
    out.sum().backward()
    assert model[0].weight.grad_second_moment.shape == (4, 3)
    # the failed pass wrote the GRU's gradients: no statistic until they are cleared
    assert model[1].weight_hh_l0.grad is not None
    assert getattr(model[1].weight_hh_l0, "grad_second_moment", None) is None
    model.zero_grad()
    out, _ = model(x)
    out.sum().backward()
    assert model[1].weight_hh_l0.grad_second_moment.shape == (6, 2)


def test_unbatched_instance_norm_input_names_the_batch_dimension():
    norm = nn.InstanceNorm2d(3, affine=True)
    tracker = stats.track(norm)
    assert tracker.fallback_modules == ()  # its own rule
    with pytest.raises(
        ValueError,
        match=r"InstanceNorm2d got an input of shape \(3, 4, 4\).*"
        r"batch dimension first.*4 dims",
    ):
        norm(torch.randn(3, 4, 4))
    tracker.detach()


def test_embedding_bag_refusals_name_the_cause():
    freq = nn.EmbeddingBag(5, 2, scale_grad_by_freq=True)
    tracker = stats.track(freq)
    with pytest.raises(ValueError, match="scale_grad_by_freq=True"):
        freq(torch.tensor([[1, 2]]))
    tracker.detach()


def test_sync_batchnorm_in_training_mode_is_refused():
    bn = nn.SyncBatchNorm(3)
    tracker = stats.track(bn)
    with pytest.raises(ValueError, match="SyncBatchNorm normalises with the mean and variance"):
        bn(torch.randn(4, 3))
    tracker.detach()


def test_a_broadcast_position_embedding_names_the_batched_call():
    """nanoGPT's wpe(arange(T)) is called once for the batch and broadcast: its output gradient
    is summed over the examples, so per-example gradients are lost; the mismatch of batch sizes
    says how to call it instead."""

    class GPTStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(10, 4), nn.Embedding(8, 4)

        def forward(self, idx, batched):
            pos = torch.arange(idx.shape[1])
            if batched:
                pos = pos.expand(idx.shape[0], -1)
            return self.wte(idx) + self.wpe(pos)

    model = GPTStem()
    idx = torch.randint(0, 10, (3, 5))
    tracker = stats.track(model)
    with pytest.raises(ValueError, match=r"batch dimension 3, module .wpe. has 5.*pos.expand"):
        model(idx, False).sum().backward()
    model.zero_grad(set_to_none=True)
    model(idx, True).sum().backward()
    assert model.wpe.weight.grad_second_moment.shape == (8, 4)
    tracker.detach()
