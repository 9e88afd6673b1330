"""Composite models against the brute-force per-example loop (float64): MLP, CNN, transformer
blocks, embedding + LSTM, weight tying, a module called twice."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from stats_brute import per_example_grads, rel_err
from torch import nn

import sgdlab.stats as stats

B = 4


def ce_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


class Block(nn.Module):
    """Pre-norm transformer block written with Linear layers (every parameter has a rule)."""

    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, -1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TiedLM(nn.Module):
    """Embedding + LSTM + output head tied to the embedding."""

    def __init__(self, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(self.lstm(self.emb(idx))[0])


class TwoLookups(nn.Module):
    """One Embedding looked up twice (its rows summed over both uses per example) and a
    head."""

    def __init__(self, vocab: int = 9, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=1)
        self.head = nn.Linear(d, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx) * self.emb(idx.flip(1))).mean(1))


class ScaledHead(nn.Module):
    """An output head without a dedicated rule (the fallback) that owns a weight tied to an
    embedding."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, h):
        return torch.tanh(h) @ self.weight.T


class TiedFallback(nn.Module):
    """Embedding tied with a fallback head: sparse rows added to materialised per-example
    gradients."""

    def __init__(self, vocab: int = 7, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = ScaledHead(self.emb.weight)

    def forward(self, idx):
        return self.head(self.emb(idx))


class Twice(nn.Module):
    """The same Linear applied twice in one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class ConvTwice(nn.Module):
    """The same Conv2d applied twice (a shared weight on the convolution's short path), then a
    Conv1d over the flattened rows with a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.conv1d = nn.Conv1d(3, 2, 3, dilation=2)
        self.conv1d.bias.requires_grad_(False)
        self.out = nn.Linear(2 * 32, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(torch.tanh(self.conv(x))))
        return self.out(torch.tanh(self.conv1d(h.flatten(2))).flatten(1))


class Decoder(nn.Module):
    """A small upsampling decoder: Linear to a 2x2 map, a ConvTranspose2d applied twice (a
    shared weight: per-example gradients summed over both uses), a grouped ConvTranspose2d with
    output padding, a Conv2d head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 3 * 2 * 2)
        self.up = nn.ConvTranspose2d(3, 3, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1, groups=1)
        self.up3 = nn.ConvTranspose2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Conv2d(4, 3, 16)

    def forward(self, x):
        h = torch.tanh(self.inp(x)).view(-1, 3, 2, 2)
        h = torch.tanh(self.up(torch.tanh(self.up(h))))
        h = torch.tanh(self.up3(torch.tanh(self.up2(h))))
        return self.head(h).flatten(1)


class CellDecoder(nn.Module):
    """A hand-written recurrent loop: an input projection, an LSTMCell and a GRUCell stepped
    over the sequence, the same Linear head at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.lstm = nn.LSTMCell(6, 5)
        self.gru = nn.GRUCell(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        state, g, outs = None, None, []
        for t in range(x.shape[1]):
            state = self.lstm(torch.tanh(self.inp(x[:, t])), state)
            g = self.gru(state[0], g)
            outs.append(self.head(g))
        return torch.stack(outs, 1)


class BagTwice(nn.Module):
    """Two EmbeddingBags (max and mean), each applied to a batch of bags and to the same bags
    reversed: shared weights, per-example gradients summed over both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.bag_max = nn.EmbeddingBag(9, 4, mode="max")
        self.bag_mean = nn.EmbeddingBag(9, 4, mode="mean", padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        r = x.flip(1)
        h = self.bag_max(x) * self.bag_max(r[:, :2]) + self.bag_mean(x) - self.bag_mean(r[:, 1:])
        return self.head(torch.tanh(h))


def mlp():
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    )


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def torch_block():
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)


def seq_target(v):
    return lambda x: torch.randint(0, v, x.shape)


MODELS = [
    ("mlp", mlp, lambda: torch.randn(B, 6), lambda x: torch.randint(0, 3, (B,))),
    ("cnn", cnn, lambda: torch.randn(B, 1, 8, 8), lambda x: torch.randint(0, 3, (B,))),
    ("block", Block, lambda: torch.randn(B, 5, 8), lambda x: torch.randint(0, 8, (B, 5))),
    ("block-seq1", Block, lambda: torch.randn(B, 1, 8), lambda x: torch.randint(0, 8, (B, 1))),
    (
        "torch-encoder-layer",
        torch_block,
        lambda: torch.randn(B, 5, 8),
        lambda x: torch.randint(0, 8, (B, 5)),
    ),
    ("tied-embedding-lstm", TiedLM, lambda: torch.randint(0, 11, (B, 6)), seq_target(11)),
    (
        "embedding-looked-up-twice",
        TwoLookups,
        lambda: torch.randint(0, 9, (B, 5)),
        lambda x: torch.randint(0, 3, (B,)),
    ),
    (
        "embedding-tied-to-a-fallback-head",
        TiedFallback,
        lambda: torch.randint(0, 7, (B, 3)),
        seq_target(7),
    ),
    ("module-called-twice", Twice, lambda: torch.randn(B, 5), lambda x: torch.randint(0, 3, (B,))),
    (
        "embedding-bags-called-twice",
        BagTwice,
        lambda: torch.randint(0, 9, (B, 5)),
        lambda x: torch.randint(0, 3, (B,)),
    ),
    (
        "recurrent-cells-loop",
        CellDecoder,
        lambda: torch.randn(B, 3, 4),
        lambda x: torch.randint(0, 3, (B, 3)),
    ),
    (
        "transposed-conv-decoder",
        Decoder,
        lambda: torch.randn(B, 4),
        lambda x: torch.randint(0, 3, (B,)),
    ),
    (
        "conv-called-twice",
        ConvTwice,
        lambda: torch.randn(B, 3, 6, 6),
        lambda x: torch.randint(0, 3, (B,)),
    ),
]


@pytest.mark.parametrize("norms", [True, False], ids=["norms", "moments-only"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", MODELS, ids=[c[0] for c in MODELS])
def test_model_matches_per_example_loop(case, reduction, norms):
    """Also without per-example norms, where 2-D nn.Linear calls take the deferred lane."""
    name, make, make_x, make_y = case
    torch.manual_seed(len(name))
    model = make().double()
    x = make_x()
    x = x.double() if x.is_floating_point() else x
    y = make_y(x)
    per = per_example_grads(model, ce_loss, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracker = stats.track(model, reduction=reduction, per_example_norms=norms)
    total = ce_loss(model(x), y)
    (total / B if reduction == "mean" else total).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (pname, p), g in zip(trainable, per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10, pname
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_second_moment", None) is None, pname
    if norms:
        expected = sum(g.pow(2).flatten(1).sum(1) for g in per)
        assert rel_err(tracker.per_example_sq_norms(), expected) < 1e-10
    tracker.detach()


class Gate(nn.Module):
    """A module with a direct parameter and no dedicated rule."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.sigmoid(self.g)


def test_fallback_warning_names_modules():
    model = nn.Sequential(nn.Linear(4, 4), torch_block(), Gate(4))
    with pytest.warns(UserWarning, match=r"2 \(Gate\)"):
        tracker = stats.track(model)
    assert tracker.fallback_modules == ("2 (Gate)",)  # attention and layers have rules
    tracker.detach()


@pytest.mark.parametrize("kind", ["block", "decoder", "cells", "tied"])
def test_chunking_under_small_memory_budget_is_exact(kind):
    """One example per chunk; for the cells also the per-example sums over a loop's calls
    (outer-product factors of every use, concatenated) in chunks."""
    torch.manual_seed(1)
    if kind == "block":
        model = Block().double()
        x = torch.randn(6, 4, 8, dtype=torch.float64)
        y = torch.randint(0, 8, (6, 4))
    elif kind == "tied":  # the head's factors per chunk, the embedding's rows added to them
        model = TiedLM().double()
        x = torch.randint(0, 11, (6, 5))
        y = torch.randint(0, 11, (6, 5))
    elif kind == "cells":
        model = CellDecoder().double()
        x = torch.randn(6, 3, 4, dtype=torch.float64)
        y = torch.randint(0, 3, (6, 3))
    else:
        model = Decoder().double()
        x = torch.randn(6, 4, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))
    per = per_example_grads(model, ce_loss, x, y)
    tracker = stats.track(model, memory_budget=1)  # one example per chunk
    (ce_loss(model(x), y) / 6).backward()
    for p, g in zip(model.parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10
    tracker.detach()


def test_every_torch_nn_layer_with_parameters_has_a_rule():
    """Every layer of torch.nn that owns parameters takes a dedicated rule, none the torch.func
    fallback (no warning): linear maps, (transposed) convolutions, embeddings and bags, every
    normalisation (BatchNorm's rule refuses training mode), PReLU, recurrent layers and cells,
    attention, and the transformer layers built from them."""
    layers = [
        nn.Linear(2, 2),
        nn.Bilinear(2, 2, 2),
        nn.Conv1d(2, 2, 1),
        nn.Conv2d(2, 2, 1),
        nn.Conv3d(2, 2, 1),
        nn.ConvTranspose1d(2, 2, 1),
        nn.ConvTranspose2d(2, 2, 1),
        nn.ConvTranspose3d(2, 2, 1),
        nn.Embedding(3, 2),
        nn.EmbeddingBag(3, 2),
        nn.BatchNorm1d(2),
        nn.BatchNorm2d(2),
        nn.BatchNorm3d(2),
        nn.SyncBatchNorm(2),
        nn.GroupNorm(1, 2),
        nn.LayerNorm(2),
        nn.RMSNorm(2),
        nn.InstanceNorm1d(2, affine=True),
        nn.InstanceNorm2d(2, affine=True),
        nn.InstanceNorm3d(2, affine=True),
        nn.PReLU(),
        nn.RNN(2, 2),
        nn.LSTM(2, 2),
        nn.GRU(2, 2),
        nn.RNNCell(2, 2),
        nn.LSTMCell(2, 2),
        nn.GRUCell(2, 2),
        nn.MultiheadAttention(2, 1),
        nn.TransformerEncoderLayer(2, 1, 4),
        nn.TransformerDecoderLayer(2, 1, 4),
        nn.AdaptiveLogSoftmaxWithLoss(4, 6, [2]),
        Decoder(),
        CellDecoder(),
        BagTwice(),
    ]
    model = nn.ModuleList(layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker = stats.track(model)
    assert tracker.fallback_modules == ()
    tracker.detach()
