"""An optimizer with a fused kernel added in one file: Signum, as in
docs/extending-optimizers.md, defined here in full (reference, foreach and fused paths, a
FusedKernel subclass, nothing added to sgdlab.optim._fast).

Oracles: the per-tensor reference in float64 (the foreach and fused paths, through a batch-size
change and a checkpoint), bfloat16 parameters stepped in float32 against the reference on
float32 copies, and the document's own code blocks, run as written.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sgdlab import hyper
from sgdlab.optim import BatchScaledOptimizer
from sgdlab.optim._base import check_hyper
from sgdlab.optim._common import group_indices
from sgdlab.optim._fast import FusedKernel, write_param


def signum_reference(params, grads, avgs, *, lr, beta, weight_decay):
    """One Signum step, tensor by tensor."""
    for p, g, m in zip(params, grads, avgs):
        m.lerp_(g, 1 - beta)
        p.mul_(1 - lr * weight_decay)
        p.add_(m.sign(), alpha=-lr)


def signum_foreach(params, grads, avgs, *, lr, beta, weight_decay):
    """:func:`signum_reference` with multi-tensor kernels (one device and dtype)."""
    torch._foreach_lerp_(avgs, grads, 1 - beta)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_sign(avgs), alpha=-lr)


class SignumKernel(FusedKernel):
    """Signum's fused step: :func:`signum_reference` on one flat buffer."""

    name = "signum"
    scalars = ("one_minus_beta", "decay", "neg_lr")
    buffers = ("exp_avg",)

    def keys(self, hp):
        return {"exp_avg": "zeros"}

    def options(self, hp, fg):
        return (("weight_decay", hp["weight_decay"] != 0),)

    def values(self, hp, fg):
        return dict(
            one_minus_beta=1 - hp["beta"], decay=1 - hp["lr"] * hp["weight_decay"], neg_lr=-hp["lr"]
        )

    def function(self, opts):
        o, ix = dict(opts), self.index()

        def signum(p, g, exp_avg, m2, master, sc):
            x = master if master is not None else p
            m = torch.lerp(exp_avg, g.to(x.dtype), sc[ix["one_minus_beta"]])
            exp_avg.copy_(m)
            if o["weight_decay"]:
                x = x * sc[ix["decay"]]
            write_param(p, master, x + sc[ix["neg_lr"]] * m.sign())

        return signum


class Signum(BatchScaledOptimizer):
    """Signum: steps by the sign of the gradients' running average."""

    _momentum_form = "ema"
    _torch_name = "Signum"
    _state_keys = {"exp_avg": "param", "master_param": "param"}
    _state_required = ("exp_avg",)
    _group_required = ("lr", "beta", "weight_decay")
    _fused_kernel = SignumKernel()

    def __init__(
        self,
        params,
        lr=1e-3,
        beta=0.9,
        weight_decay=0.0,
        *,
        batch_size=None,
        ref_batch_size=None,
        scaling=None,
        foreach=None,
        nonfinite="raise",
        fused=None,
    ):
        super().__init__(
            params,
            dict(lr=lr, beta=beta, weight_decay=weight_decay),
            batch_size=batch_size,
            ref_batch_size=ref_batch_size,
            scaling=scaling,
            default_scaling="linear",
            foreach=foreach,
            nonfinite=nonfinite,
            fused=fused,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_hyper(group, "lr")
        check_hyper(group, "beta", below_one=True)
        check_hyper(group, "weight_decay")

    def _hyper_of(self, group):
        return hyper.PerStep(lr=group["lr"], beta1=group["beta"])

    def _with_hyper(self, group, step):
        return {"lr": step.lr, "beta": step.beta1}

    def _update_group(self, group, hp, foreach):
        params = [p for p in group["params"] if p.grad is not None]
        if self._step_fused(group, hp, params):
            return
        for p in params:
            if "exp_avg" not in self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
        kwargs = dict(lr=hp["lr"], beta=hp["beta"], weight_decay=hp["weight_decay"])
        for idx in group_indices(params) if foreach else [list(range(len(params)))]:
            ps = [params[i] for i in idx]
            step = signum_foreach if foreach else signum_reference
            step(ps, [p.grad for p in ps], [self.state[p]["exp_avg"] for p in ps], **kwargs)


DOC = Path(__file__).resolve().parents[2] / "docs" / "extending-optimizers.md"
PATHS = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _run(path: str, dtype: torch.dtype = torch.float64, steps: int = 8) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    # start and gradients are bfloat16 values, so every dtype steps from the same numbers
    start = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in [(6, 4), (9,)]]
    params = [t.to(dtype).requires_grad_() for t in start]
    opt = Signum(params, lr=0.02, beta=0.7, weight_decay=0.05, ref_batch_size=8,
                 **PATHS[path])  # fmt: skip
    for t in range(steps):
        for p in params:
            g = torch.cos(torch.arange(p.numel(), dtype=torch.float64) * (t + 2))
            p.grad = g.view_as(p).to(torch.bfloat16).to(dtype)
        if t == 4:  # a resume mid-run, at a new batch size (lr and beta move)
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt.step(batch_size=8 if t < 4 else 32)
    return params


@pytest.mark.parametrize("path", ["foreach", "fused"])
def test_signum_paths_equal_the_reference_in_float64(path):
    for p, q in zip(_run(path), _run("reference")):
        assert torch.max(torch.abs(p - q)).item() <= 1e-12


def test_signum_fused_step_runs_on_flat_buffers():
    params = [torch.randn(5, dtype=torch.float64, requires_grad=True)]
    opt = Signum(params, lr=0.1, fused=True)
    params[0].grad = torch.ones(5, dtype=torch.float64)
    opt.step()
    (entry,) = opt._fused.entries.values()
    (fg,) = entry.fgs
    assert opt.state[params[0]]["exp_avg"].data_ptr() == fg.flat_state["exp_avg"].data_ptr()


def test_signum_bfloat16_steps_in_float32():
    """bfloat16 parameters: float32 master weights and state, so the parameters are the
    float32 reference's rounded to bfloat16 (within one bfloat16 rounding)."""
    low = _run("fused", torch.bfloat16)
    ref = _run("reference", torch.float32)
    for p, q in zip(low, ref):
        torch.testing.assert_close(p.detach().float(), q.detach(), atol=0, rtol=2**-8)


def test_the_document_runs_as_written():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert set(namespace["runs"]) == {("foreach", False), ("foreach", True), ("fused", True)}
