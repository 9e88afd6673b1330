"""Multi-layer RNN/LSTM/GRU with dropout between layers in training mode (the classic word
language model's ``nn.LSTM(..., dropout=0.5)``): the rule redraws the masks from the generator
state recorded before the call. Oracle: per-example gradients of the same batched graph (one
``autograd.grad`` per example's loss with ``retain_graph``), both passes seeded alike; in
float32 too, where the CPU kernel may run oneDNN's LSTM (its masks are drawn the same way)."""

from __future__ import annotations

import pytest
import torch
from stats_brute import assert_statistics, same_graph_grads
from torch import nn

import sgdlab.stats as stats

B, T = 4, 5

LAYERS = {
    "lstm-3layer-bidir-proj": lambda bf: nn.LSTM(
        3, 4, num_layers=3, bidirectional=True, proj_size=2, dropout=0.4, batch_first=bf
    ),
    "lstm-2layer": lambda bf: nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=bf),
    "gru-2layer": lambda bf: nn.GRU(3, 4, num_layers=2, dropout=0.3, batch_first=bf),
    "rnn-2layer-bidir": lambda bf: nn.RNN(
        3, 4, num_layers=2, bidirectional=True, dropout=0.3, batch_first=bf
    ),
}


def _losses(rnn, x):
    out, h = rnn(x)
    h = h[0] if isinstance(h, tuple) else h
    dims = (1, 2) if rnn.batch_first else (0, 2)
    return out.pow(2).sum(dims) + h.pow(2).sum((0, 2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_dropout_between_layers_matches_per_example_gradients(kind, batch_first, dtype):
    torch.manual_seed(0)
    rnn = LAYERS[kind](batch_first).to(dtype)
    x = torch.randn(B, T, 3, dtype=dtype)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    params = list(rnn.parameters())
    torch.manual_seed(5)
    losses = _losses(rnn, x)
    per = same_graph_grads(losses, params)
    tracker = stats.track(rnn, reduction="sum", per_example_norms=True)
    torch.manual_seed(5)
    _losses(rnn, x).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-4  # other masks: errors of order one
    assert_statistics(rnn, per, tracker, tol=tol)
    tracker.detach()


def test_redrawing_leaves_the_random_stream_and_gradients_unchanged():
    torch.manual_seed(1)
    plain = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True)
    tracked = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True)
    tracked.load_state_dict(plain.state_dict())
    x = torch.randn(B, T, 3)
    draws = []
    for rnn in (plain, tracked):
        tracker = stats.track(rnn) if rnn is tracked else None
        torch.manual_seed(2)
        _losses(rnn, x).mean().backward()
        draws.append(torch.rand(3))
        if tracker is not None:
            tracker.detach()
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    for a, b in zip(plain.parameters(), tracked.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("sort", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("kind", ["lstm-3layer-bidir-proj", "gru-2layer"])
def test_dropout_between_layers_on_packed_sequences(kind, sort):
    """The kernel drops out each layer's packed data; the rerun draws on the same packed
    layout (examples of unequal lengths, sorted or not)."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(3)
    rnn = LAYERS[kind](True).double()
    lengths = torch.tensor([5, 4, 2, 1]) if sort else torch.tensor([2, 5, 1, 4])
    x = torch.randn(B, T, 3, dtype=torch.float64)

    def losses(m):
        out, h = m(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=sort))
        h = h[0] if isinstance(h, tuple) else h
        pad = pad_packed_sequence(out, batch_first=True)[0]
        return pad.pow(2).sum((1, 2)) + h.pow(2).sum((0, 2))

    params = list(rnn.parameters())
    torch.manual_seed(6)
    ls = losses(rnn)
    per = same_graph_grads(ls, params)
    tracker = stats.track(rnn, reduction="sum")
    torch.manual_seed(6)
    losses(rnn).sum().backward()
    assert_statistics(rnn, per)
    tracker.detach()
