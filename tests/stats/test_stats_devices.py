"""The augmented backward on each device (CUDA skipped without one): every rule the benchmark's
models use, the deferred 2-D ``nn.Linear`` lane included, against the brute-force per-example
loop in float64 on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from stats_brute import per_example_grads, rel_err
from test_stats_models import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

import sgdlab.stats as stats

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]
B = 8


class TiedMean(nn.Module):
    """An output head tied to the embedding (sparse rows added to the head's factors)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 6)
        self.head = nn.Linear(6, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx))).mean(1)


class Checkpointed(nn.Module):
    """A pre-norm MLP block under non-reentrant activation checkpointing (inputs kept as
    autograd saved tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
        self.out = nn.Linear(8 * 4, 5)

    def forward(self, x):
        h = checkpoint(self.block, self.inp(x), use_reentrant=False)
        return self.out(h.flatten(1))


MODELS = {
    "mlp": (
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(36, 12),
            nn.ReLU(),
            nn.Linear(12, 12),
            nn.ReLU(),
            nn.Linear(12, 5),
        ),
        lambda: torch.randn(B, 1, 6, 6),
    ),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(54, 5),
        ),
        lambda: torch.randn(B, 1, 6, 6),
    ),
    "block": (
        lambda: nn.Sequential(Block(16), nn.Flatten(), nn.Linear(7 * 16, 5)),
        lambda: torch.randn(B, 7, 16),
    ),
    "tied": (TiedMean, lambda: torch.randint(0, 5, (B, 4))),
    "checkpointed": (Checkpointed, lambda: torch.randn(B, 4, 3)),
    "decoder": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(3, 4, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 2, 3, 2, 1, output_padding=1, groups=2),
            nn.Flatten(),
            nn.Linear(2 * 12 * 12, 5),
        ),
        lambda: torch.randn(B, 3, 3, 3),
    ),
}


def loss_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("budget", [2**25, 1], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("device", DEVICES)
def test_statistics_match_the_cpu_brute_force(device, name, budget):
    make, make_x = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    x = make_x()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 5, (B,))
    per = per_example_grads(model, loss_sum, x, y)
    model = model.to(device)
    tracker = stats.track(model, memory_budget=budget)
    (loss_sum(model(x.to(device)), y.to(device)) / B).backward()
    for (pname, p), g in zip(model.named_parameters(), per, strict=True):
        assert p.grad_second_moment.device == p.device
        assert rel_err(p.grad_second_moment.cpu(), (g * g).mean(0)) < 1e-10, pname
    tracker.detach()


def _deep_mlp():
    """Six Linear layers (two launches of the fused kernel on a GPU), one without bias."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(36, 70)]
    for n_in, n_out, bias in [(70, 65, True), (65, 17, False), (17, 33, True), (33, 9, True)]:
        layers += [nn.Tanh(), nn.Linear(n_in, n_out, bias=bias)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(9, 5))


def _convs():
    """Stride, dilation, a non-square kernel, asymmetric padding, a reflect-padded 'same'
    convolution without bias."""
    return nn.Sequential(
        nn.Conv2d(1, 5, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1)),
        nn.ReLU(),
        nn.Conv2d(5, 4, 3, bias=False, padding="same", padding_mode="reflect"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(96, 5),
    )


@pytest.mark.parametrize("batch", [8, 45])
@pytest.mark.parametrize("name", ["mlp", "cnn", "deep", "convs", "block"])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_statistics_match_the_float64_brute_force(device, name, batch):
    """float32 parameters: on a GPU with Triton the 2-D Linear calls take the fused kernel
    (sgdlab.stats._fused_linear); every path (the block: Linear on sequences, LayerNorm,
    attention) must agree with float64 to fp32 rounding."""
    from sgdlab.stats import _fused_linear

    make = {"deep": _deep_mlp, "convs": _convs}.get(name) or MODELS[name][0]
    torch.manual_seed(1)
    model = make().double()
    x = torch.randn(batch, *((7, 16) if name == "block" else (1, 6, 6)), dtype=torch.float64)
    y = torch.randint(0, 5, (batch,))
    per = per_example_grads(model, loss_sum, x, y)
    model = model.float().to(device)
    xd = x.float().to(device)
    if device == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            has_triton = False
        else:
            has_triton = True
        assert _fused_linear.available(xd, torch.float32) == has_triton
    tracker = stats.track(model)
    (loss_sum(model(xd), y.to(device)) / batch).backward()
    for (pname, p), g in zip(model.named_parameters(), per, strict=True):
        assert p.grad_second_moment.dtype == torch.float32
        assert rel_err(p.grad_second_moment.double().cpu(), (g * g).mean(0)) < 2e-6, pname
    tracker.detach()


def _other_rule_calls(device):
    """(rule, Call) for an EmbeddingBag (offsets; mean and max), a ConvTranspose1d and an
    LSTMCell with a state, float32 on ``device``."""
    from sgdlab.stats._base import Call
    from sgdlab.stats.cell import cell_rule
    from sgdlab.stats.conv_transpose import conv_transpose_rule
    from sgdlab.stats.embedding_bag import embedding_bag_rule

    n = 6
    flat = torch.randint(0, 20, (n * 5,), device=device)
    offsets = torch.arange(0, n * 5, 5, device=device)
    out = []
    for mode in ("mean", "max"):
        bag = nn.EmbeddingBag(20, 4, mode=mode, padding_idx=0).to(device)
        out.append(
            (
                embedding_bag_rule,
                Call(
                    bag,
                    (flat, offsets),
                    {},
                    (torch.randn(n, 4, device=device),),
                    n,
                    ("weight",),
                    frozenset(),
                    False,
                    2**27,
                    scale=6.0,
                ),
            )
        )
    up = nn.ConvTranspose1d(4, 3, 3, stride=2).to(device)
    out.append(
        (
            conv_transpose_rule,
            Call(
                up,
                (torch.randn(n, 4, 7, device=device),),
                {},
                (torch.randn(n, 3, 15, device=device),),
                n,
                ("weight", "bias"),
                frozenset(),
                False,
                2**27,
                scale=6.0,
            ),
        )
    )
    cell = nn.LSTMCell(4, 3).to(device)
    state = (torch.randn(n, 3, device=device), torch.randn(n, 3, device=device))
    out.append(
        (
            cell_rule,
            Call(
                cell,
                (torch.randn(n, 4, device=device), state),
                {},
                (torch.randn(n, 3, device=device), torch.randn(n, 3, device=device)),
                n,
                ("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
                frozenset(),
                False,
                2**27,
                scale=6.0,
            ),
        )
    )
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_rules_on_the_short_paths_never_wait_for_the_device(device):
    """The short paths and the rules for embeddings, bags, transposed convolutions and cells
    have static shapes (no ``unique``, boolean indexing or host reads), so on a GPU they never
    synchronise with it: run under
    ``torch.cuda.set_sync_debug_mode("error")``, which raises on a synchronising call (on the
    CPU the same calls run unchecked). The Linear lane's fused kernel is compiled before."""
    from sgdlab.stats._base import Call
    from sgdlab.stats.conv import conv_moments
    from sgdlab.stats.embedding import embedding_rule
    from sgdlab.stats.linear import linear_moments, linear_seq_moments
    from sgdlab.stats.norm import norm_moments

    torch.manual_seed(2)
    others = _other_rule_calls(device)
    n = 6
    emb = nn.Embedding(20, 4, padding_idx=0).to(device)
    lin, norm, conv = (m.to(device) for m in (nn.Linear(4, 3), nn.LayerNorm(4), nn.Conv1d(4, 3, 3)))
    idx = torch.randint(0, 20, (n, 5), device=device)
    x = torch.randn(n, 5, 4, device=device)
    xc = torch.randn(n, 4, 7, device=device)
    d = torch.randn(n, 5, 3, device=device)
    dn = torch.randn(n, 5, 4, device=device)
    dc = torch.randn(n, 3, 5, device=device)
    call = Call(emb, (idx,), {}, (dn,), n, ("weight",), frozenset(), False, 2**27, scale=6.0)

    def run():
        return (
            linear_moments([(True, True, torch.float32, x[:, 0], d[:, 0])], 6.0),
            linear_seq_moments(lin, x, d, 6.0, 2**27, True, True),
            norm_moments(norm, x, dn, 6.0, 2**27, True, True),
            conv_moments(conv, xc, dc, 6.0, 2**27, True, True),
            embedding_rule(call)["weight"].moment,
            [{k: c.moment for k, c in rule(c_).items()} for rule, c_ in others],
        )

    expected = run()  # compiles the fused kernel where there is one
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        got = run()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    flat = [t for r in (got, expected) for t in torch.utils._pytree.tree_leaves(r)]
    half = len(flat) // 2
    # equal up to the order of atomic additions (index_add on a GPU)
    assert all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(flat[:half], flat[half:], strict=True)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_redraw_on_each_device(device):
    """Attention dropout (SDPA's kernel on a GPU, philox offsets) and dropout in a fallback
    module are redrawn from the device generator's recorded state: statistics against the
    per-example gradients of the same batched graph, in float64."""

    class Gate(nn.Module):  # a fallback module with dropout inside
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.linspace(0.5, 1.5, 8))
            self.drop = nn.Dropout(0.3)

        def forward(self, x):
            return self.drop(x) * self.g

    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True), Gate())
        .double()
        .to(device)
    )
    x = torch.randn(4, 5, 8, dtype=torch.float64, device=device)
    params = list(model.parameters())

    def losses():
        return model(x).pow(2).sum((1, 2))

    torch.manual_seed(3)
    ls = losses()
    per = [
        torch.stack(r)
        for r in zip(
            *[torch.autograd.grad(ls[b], params, retain_graph=True) for b in range(4)], strict=True
        )
    ]
    with pytest.warns(UserWarning, match="fallback"):
        tracker = stats.track(model, reduction="sum")
    torch.manual_seed(3)
    losses().sum().backward()
    for (name, p), g in zip(model.named_parameters(), per, strict=True):
        assert rel_err(p.grad_second_moment, (g * g).mean(0)) < 1e-10, name
    tracker.detach()
