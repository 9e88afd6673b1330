"""``nn.MultiheadAttention`` with active dropout (``nn.TransformerEncoderLayer``'s default 0.1):
the rule reruns the attention from the generator states of the forward call, so with its
dropout masks. Oracle in float64: per-example gradients from the *same* batched graph (one
``autograd.grad`` of each example's loss with ``retain_graph``), so every example sees the masks
the batch drew; a rerun with other masks differs by tens of percent."""

from __future__ import annotations

import pytest
import torch
from stats_brute import assert_statistics, rel_err, same_graph_grads
from torch import nn

import sgdlab.stats as stats

B, T, D = 4, 5, 8


def _check(model, run, reduction="sum", seed=5):
    """Statistics and per-example norms of ``run(model)`` (per-example losses [B]) against the
    oracle, both forward passes from the generator seeded with ``seed``."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    per = same_graph_grads(run(model), params)
    tracker = stats.track(model, reduction=reduction, per_example_norms=True)
    torch.manual_seed(seed)
    total = run(model).sum()
    (total / B if reduction == "mean" else total).backward()
    assert_statistics(model, per, tracker, unused_ok=True)  # some unused by a call pattern
    tracker.detach()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_with_dropout_matches_per_example_gradients(norm_first, reduction):
    """torch's encoder layer in training mode with dropout everywhere (attention, residual,
    feed-forward), a key-padding mask and a causal mask."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(
        D, 2, 16, dropout=0.3, batch_first=True, norm_first=norm_first
    ).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 3:] = True
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    _check(
        layer,
        lambda m: (
            m(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True).pow(2).sum((1, 2))
        ),
        reduction,
    )


ATTENTION = {
    "self-weights-averaged": (dict(), dict(need_weights=True)),
    "self-weights-per-head": (dict(), dict(need_weights=True, average_attn_weights=False)),
    "self-no-weights": (dict(), dict(need_weights=False)),
    "seq-first": (dict(batch_first=False), dict(need_weights=False)),
    "cross-kdim-vdim": (dict(kdim=3, vdim=6), dict(need_weights=True)),
    "no-bias": (dict(bias=False), dict(need_weights=False)),
}


@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_with_dropout_matches_per_example_gradients(case):
    """The loss reads the attention output and, when returned, the attention weights (dropped
    out too); a key-padding mask on one example."""
    make_kw, call_kw = ATTENTION[case]
    make_kw = {"batch_first": True, **make_kw}
    torch.manual_seed(2)
    m = nn.MultiheadAttention(D, 2, dropout=0.4, **make_kw).double()
    bf = make_kw["batch_first"]
    shape = (B, T) if bf else (T, B)
    q = torch.randn(*shape, D, dtype=torch.float64)
    k = torch.randn(*shape, make_kw.get("kdim", D), dtype=torch.float64)
    v = torch.randn(*shape, make_kw.get("vdim", D), dtype=torch.float64)
    if "kdim" not in make_kw:
        k = v = q
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[2, 1:3] = True

    def run(mod):
        out, w = mod(q, k, v, key_padding_mask=pad, **call_kw)
        loss = out.pow(2).sum((1, 2) if bf else (0, 2))
        if w is not None:
            loss = loss + w.sin().flatten(1).sum(1)
        return loss

    _check(m, run)


def test_per_example_3d_mask_with_and_without_dropout():
    """A 3-D mask ``[B * heads, L, S]`` (a different mask per example and head) takes torch's
    own attention in the rule, with or without dropout (it used to take the fallback, which
    refused it)."""
    torch.manual_seed(3)
    mask = torch.randn(B * 2, T, T, dtype=torch.float64)
    x = torch.randn(B, T, D, dtype=torch.float64)
    for p in (0.0, 0.25):
        m = nn.MultiheadAttention(D, 2, dropout=p, batch_first=True).double()
        _check(m, lambda mod: mod(x, x, x, attn_mask=mask)[0].pow(2).sum((1, 2)))


def test_tracking_leaves_the_random_stream_and_the_gradients_unchanged():
    """The rerun draws from a fork of the generator: the training run's next random numbers
    and its gradients are those of an untracked run."""
    torch.manual_seed(4)
    plain = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.2, batch_first=True)
    tracked = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.2, batch_first=True)
    tracked.load_state_dict(plain.state_dict())
    x = torch.randn(B, T, D)
    draws = []
    for model in (plain, tracked):
        tracker = stats.track(model) if model is tracked else None
        torch.manual_seed(6)
        model(x).square().mean().backward()
        draws.append(torch.rand(3))
        if tracker is not None:
            tracker.detach()
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_a_rerun_with_other_masks_would_be_wrong():
    """The oracle tells masks apart: replaying from a different generator state changes the
    statistics by far more than the tolerance."""
    torch.manual_seed(7)
    m = nn.MultiheadAttention(D, 2, dropout=0.4, batch_first=True).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    params = list(m.parameters())
    torch.manual_seed(8)
    per = same_graph_grads(m(x, x, x)[0].pow(2).sum((1, 2)), params)
    tracker = stats.track(m, reduction="sum")
    torch.manual_seed(9)  # the forward pass draws other masks than the oracle's
    m(x, x, x)[0].pow(2).sum().backward()
    assert rel_err(m.in_proj_weight.grad_second_moment, (per[0] ** 2).mean(0)) > 1e-2
    tracker.detach()


class SeqFirstModel(nn.Module):
    """torch's ``nn.Transformer`` with ``batch_first=False`` (its default): its feed-forward and
    norm layers see ``[T, B, d]``; a head outside it sees ``[B, d]``."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(D, 2, 1, 1, 16, dropout=0.2)
        self.head = nn.Linear(D, 3)

    def forward(self, src, tgt):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[0], dtype=tgt.dtype)
        return self.head(self.transformer(src, tgt, tgt_mask=causal).mean(0))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch's, at construction
@pytest.mark.parametrize("tgt_len", [B, B + 2], ids=["T-equals-B", "T-differs"])
def test_seq_first_torch_transformer_matches_per_example_gradients(tgt_len):
    """Inside torch's transformer modules built with ``batch_first=False`` the tracker reads
    the batch from dimension 1 (before, ``T != B`` raised and ``T == B`` gave wrong
    statistics)."""
    torch.manual_seed(12)
    model = SeqFirstModel().double()
    src = torch.randn(B + 1, B, D, dtype=torch.float64)
    tgt = torch.randn(tgt_len, B, D, dtype=torch.float64)
    _check(model, lambda m: m(src, tgt).pow(2).sum(1))
    layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.1).double()
    _check(layer, lambda m: m(tgt).pow(2).sum((0, 2)))


def test_a_redraw_that_does_not_reproduce_the_draws_is_refused():
    """The rerun checks that the generator ends where the call left it: here a pre-hook
    registered after the tracker's draws inside the call's bracket, as a compiled module drawing
    with inductor's generator would (tests/stats/test_stats_compile.py)."""
    torch.manual_seed(13)
    m = nn.MultiheadAttention(D, 2, dropout=0.3, batch_first=True).double()
    tracker = stats.track(m)
    m.register_forward_pre_hook(lambda module, args: torch.rand(1) and None)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="did not draw what the forward pass drew"):
        m(x, x, x)[0].square().mean().backward()
    tracker.detach()


def test_dropout_raised_after_attaching_asks_to_attach_again():
    """Layers attached with dropout 0 get no pre-hook; raising the dropout later is caught."""
    m = nn.MultiheadAttention(D, 2, dropout=0.0, batch_first=True)
    rnn = nn.LSTM(D, D, num_layers=2, dropout=0.0, batch_first=True)
    x = torch.randn(B, T, D)
    for module, run in ((m, lambda: m(x, x, x)[0]), (rnn, lambda: rnn(x)[0])):
        tracker = stats.track(module)
        module.dropout = 0.2
        with pytest.raises(RuntimeError, match="attach the tracker again"):
            run().square().mean().backward()
        tracker.detach()
        with stats.track(module):  # attached again: the masks are redrawn
            run().square().mean().backward()
