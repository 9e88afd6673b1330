"""The fused GPU kernels (sgdlab.stats._fused_linear, _fused_conv) fall back to torch operations
when they cannot run: same statistics, one warning, the kernel off afterwards. The kernels
themselves are checked on a GPU by test_stats_devices.py (float32 against float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sgdlab.stats import _fused_conv, _fused_linear, conv, linear


def test_a_failing_fused_kernel_falls_back_to_torch_with_a_warning(monkeypatch):
    """Where the fused GPU kernel is chosen but cannot run (a broken Triton), the statistics
    come from the torch path, with one warning, and the kernel stays off."""
    def broken(calls, scale):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(_fused_linear, "available", lambda t, dtype: True)
    monkeypatch.setattr(_fused_linear, "fused_linear_moments", broken)
    monkeypatch.setattr(_fused_linear, "_kernel", None)
    torch.manual_seed(0)
    a, d = torch.randn(6, 4), torch.randn(6, 3)
    calls = [(True, True, torch.float32, a, d)]
    with pytest.warns(RuntimeWarning, match="fused Triton kernel failed.*no compiler"):
        (w, b), = linear.linear_moments(calls, 2.0)
    assert _fused_linear._kernel is False
    torch.testing.assert_close(w, 2.0 * (d * d).T @ (a * a))
    torch.testing.assert_close(b, 2.0 * (d * d).sum(0))


def test_a_failing_fused_conv_kernel_falls_back_to_torch_with_a_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(_fused_conv, "available", lambda module, x: True)
    monkeypatch.setattr(_fused_conv, "fused_conv2d_moments", broken)
    monkeypatch.setattr(_fused_conv, "_kernel", None)
    torch.manual_seed(0)
    m = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 5, 5)
    d = torch.randn(4, 3, 5, 5)
    with pytest.warns(RuntimeWarning, match="fused Triton convolution kernel failed"):
        w, b = conv.conv_moments(m, x, d, 2.0, 2**25, True, True)
    assert _fused_conv._kernel is False
    cols = torch.nn.functional.unfold(x, 3, padding=1)  # [B, C*9, P]
    g = torch.einsum("bop,bkp->bok", d.flatten(2), cols)
    torch.testing.assert_close(w, 2.0 * (g * g).sum(0).view_as(m.weight))
    torch.testing.assert_close(b, 2.0 * d.sum((2, 3)).pow(2).sum(0))
