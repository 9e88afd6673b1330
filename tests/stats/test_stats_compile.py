"""The augmented backward on a ``torch.compile``d model: the forward hooks run (dynamo breaks
the graph at each tracked call, where the hook reads the output's autograd node) and the
statistics equal those of the eager model; no tracing warning from the tracker's hooks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sgdlab import stats


class Net(nn.Module):
    def __init__(self, ckpt: bool) -> None:
        super().__init__()
        self.ckpt = ckpt
        self.a, self.ln, self.b = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3)

    def forward(self, x):
        def inner(z):
            return torch.tanh(self.ln(self.a(z)))

        h = checkpoint(inner, x, use_reentrant=False) if self.ckpt else inner(x)
        return self.b(h)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
def test_compiled_model_gives_the_eager_statistics(ckpt):
    torch.manual_seed(0)
    model = Net(ckpt).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 3, dtype=torch.float64)

    def step(f):
        model.zero_grad(set_to_none=True)
        ((f(x) - y) ** 2).sum(1).mean().backward()
        return [p.grad_second_moment.clone() for p in model.parameters()]

    with stats.track(model):
        eager = step(model)
        torch._dynamo.reset()
        compiled = torch.compile(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):  # the first call compiles, the second runs the compiled code
                got = step(compiled)
                for g, e in zip(got, eager, strict=True):
                    torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)
    assert not [w for w in caught if "does not know how to trace" in str(w.message)]


def test_compiled_attention_dropout_is_refused_not_misread():
    """Inductor draws a compiled module's dropout masks with its own generator, so rerunning
    the attention in eager mode would use other masks: the rerun notices that the generator
    did not end where the call left it and refuses (the statistics were silently wrong)."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    with stats.track(layer):
        torch._dynamo.reset()
        compiled = torch.compile(layer)
        with pytest.raises(RuntimeError, match="torch.compile"):
            compiled(x).square().mean().backward()
