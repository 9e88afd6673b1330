"""Recurrent layers on packed sequences (``pack_padded_sequence``: every example its own length)
against the brute-force loop in float64, where each example is packed alone with its length.

The packed kernel stops each example's recurrence at its length (its final state is the one at
its last step; the reverse direction starts there), so a rerun on the padded layout without the
mask would give wrong statistics for every example shorter than the longest."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats_brute import assert_statistics
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import sgdlab.stats as stats

B, T = 5, 6

LAYERS = {
    "lstm-2layer-bidir-proj": lambda bf: nn.LSTM(
        3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=bf
    ),
    "gru-2layer-bidir": lambda bf: nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=bf),
    "rnn-relu": lambda bf: nn.RNN(3, 4, nonlinearity="relu", batch_first=bf),
    "lstm-nobias": lambda bf: nn.LSTM(3, 4, bias=False, batch_first=bf),
}


class Packed(nn.Module):
    """The recurrent layer on packed inputs; the loss reads the padded outputs and the final
    states (an LSTM's cell state too), per example."""

    def __init__(self, rnn: nn.Module, sort: bool) -> None:
        super().__init__()
        self.rnn, self.sort = rnn, sort

    def forward(self, x, lengths):
        bf = self.rnn.batch_first
        packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=self.sort)
        out, state = self.rnn(packed)
        pad = pad_packed_sequence(out, batch_first=bf, total_length=T)[0]
        states = state if isinstance(state, tuple) else (state,)
        per_example = pad.pow(2).sum((1, 2) if bf else (0, 2))
        return per_example + sum(s.pow(3).sum((0, 2)) for s in states)


def _per_example(model: Packed, x, lengths, bd):
    params = list(model.parameters())
    rows = []
    for b in range(B):
        rows.append(
            torch.autograd.grad(model(x.narrow(bd, b, 1), lengths[b : b + 1]).sum(), params)
        )
    return [torch.stack(r) for r in zip(*rows, strict=True)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("sort", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_packed_sequences_match_per_example_loop(kind, sort, batch_first, reduction):
    torch.manual_seed(len(kind))
    lengths = torch.tensor([6, 4, 4, 3, 1]) if sort else torch.tensor([3, 6, 1, 4, 2])
    model = Packed(LAYERS[kind](batch_first), sort).double()
    x = torch.randn(B, T, 3, dtype=torch.float64)
    bd = 0 if batch_first else 1
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    per = _per_example(model, x, lengths, bd)
    tracker = stats.track(model, reduction=reduction, per_example_norms=True)
    total = model(x, lengths).sum()
    (total / B if reduction == "mean" else total).backward()
    assert_statistics(model, per, tracker)
    tracker.detach()


@pytest.mark.parametrize("kind", ["lstm-2layer-bidir-proj", "gru-2layer-bidir"])
def test_packed_sequences_with_an_initial_state(kind):
    """An initial state given in the examples' order (torch permutes it into the packed
    order): the per-example gradients are those of each example with its own row of it."""
    torch.manual_seed(7)
    rnn = LAYERS[kind](True).double()
    lengths = torch.tensor([2, 6, 5, 1, 3])
    x = torch.randn(B, T, 3, dtype=torch.float64)
    d = 4
    p = 2 if isinstance(rnn, nn.LSTM) else 4
    h0 = torch.randn(d, B, p, dtype=torch.float64)
    c0 = torch.randn(d, B, 4, dtype=torch.float64)

    def loss(xb, lb, rows):
        hx = (h0[:, rows], c0[:, rows]) if isinstance(rnn, nn.LSTM) else h0[:, rows]
        out, _ = rnn(pack_padded_sequence(xb, lb, batch_first=True, enforce_sorted=False), hx)
        return pad_packed_sequence(out, batch_first=True)[0].sin().sum()

    params = list(rnn.parameters())
    per = [
        torch.stack(r)
        for r in zip(
            *[
                torch.autograd.grad(loss(x[b : b + 1], lengths[b : b + 1], [b]), params)
                for b in range(B)
            ],
            strict=True,
        )
    ]
    tracker = stats.track(rnn, reduction="sum")
    loss(x, lengths, list(range(B))).backward()
    assert_statistics(rnn, per)
    tracker.detach()


class TextClassifier(nn.Module):
    """Embedding (padding index 0) + packed bidirectional LSTM + a head on the final states:
    the classic variable-length text classifier."""

    def __init__(self, vocab: int = 13, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.lstm = nn.LSTM(d, d, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * d, classes)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(
            self.emb(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        return self.head(torch.cat([h[0], h[1]], -1))


def test_packed_text_classifier_matches_per_example_loop():
    """Every module's statistics and the per-example norms, which add the modules'
    per-example parts example by example (the LSTM's in the examples' order, not the packed
    order)."""
    torch.manual_seed(11)
    model = TextClassifier().double()
    lengths = torch.tensor([2, 6, 1, 5, 4])
    tokens = torch.randint(1, 13, (B, T))
    tokens[torch.arange(T) >= lengths.unsqueeze(1)] = 0
    y = torch.randint(0, 3, (B,))
    params = list(model.parameters())
    per = [
        torch.stack(r)
        for r in zip(
            *[
                torch.autograd.grad(
                    F.cross_entropy(model(tokens[b : b + 1], lengths[b : b + 1]), y[b : b + 1]),
                    params,
                )
                for b in range(B)
            ],
            strict=True,
        )
    ]
    tracker = stats.track(model, per_example_norms=True)
    F.cross_entropy(model(tokens, lengths), y).backward()
    assert_statistics(model, per, tracker)
    tracker.detach()
