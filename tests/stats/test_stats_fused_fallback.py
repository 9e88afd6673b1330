"""The fused GPU kernel (sgdlab.stats._fused_linear) falls back to torch operations when it cannot
run: same statistics, one warning, the kernel off afterwards. The kernel itself is checked on a
GPU by test_stats_devices.py (float32 against float64)."""

from __future__ import annotations

import pytest
import torch

from sgdlab.stats import _fused_linear, linear


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
        ((w, b),) = linear.linear_moments(calls, 2.0)
    assert _fused_linear._kernel is False
    torch.testing.assert_close(w, 2.0 * (d * d).T @ (a * a))
    torch.testing.assert_close(b, 2.0 * (d * d).sum(0))
