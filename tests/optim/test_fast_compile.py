"""The compiled kernels: equal to the reference in float64, compiled once (a new learning rate,
batch size or step count does not recompile), and usable inside ``torch.compile`` of a whole
training step. Compilation on 2 CPU cores takes 10-40 s per kernel variant when inductor's
on-disk cache is cold, so this file compiles few variants: Adam's default (shared by the
tests below, compiled once per process) and SGD with Nesterov momentum (two variants: the
first step initialises the buffer)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import sgdlab
from sgdlab.optim import _fast

from .cases import make_params, set_grads, state_tensors


@pytest.fixture(autouse=True)
def compiled_kernels():
    previous = _fast.set_compile(True)
    yield
    _fast.set_compile(previous)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (sgdlab.Adam, dict(lr=0.01, ref_batch_size=8)),
        (sgdlab.SGD, dict(lr=0.02, momentum=0.8, nesterov=True, ref_batch_size=8)),
    ],
    ids=["adam", "sgd-nesterov"],
)
def test_compiled_equals_reference_without_recompiling(cls, kwargs):
    ref_p, fu_p = make_params(3), make_params(3)
    ref = cls(ref_p, foreach=False, **kwargs)
    fu = cls(fu_p, fused=True, **kwargs)
    graphs = None
    for t in range(12):
        set_grads(ref_p, t)
        set_grads(fu_p, t)
        for opt in (ref, fu):
            opt.param_groups[0]["lr"] = kwargs["lr"] * (1 + t % 4)  # as a scheduler would
            opt.step(batch_size=(4, 8, 16)[t % 3])
        if t == 1:
            graphs = _graphs()  # both SGD variants (buffer init, steady state) exist now
    assert _graphs() == graphs, "a new lr, batch size or step recompiled the kernel"
    for a, b in zip(ref_p, fu_p):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12
    s_ref, s_fu = state_tensors(ref), state_tensors(fu)
    assert s_ref.keys() == s_fu.keys()
    for key, value in s_ref.items():
        if isinstance(value, torch.Tensor):
            assert torch.max(torch.abs(value - s_fu[key])).item() <= 1e-12, key
    assert any(
        k[0] == cls.__name__.lower() and k[3] == torch.float64 for k in _fast.COMPILE_SECONDS
    ), "the kernel did not run compiled"


def test_whole_training_step_under_torch_compile():
    """``torch.compile`` of forward + backward + ``opt.step()`` + ``zero_grad``: same
    trajectory as the eager reference (float64), and the fused kernel runs compiled."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = sgdlab.Adam(model.parameters(), lr=0.01, fused=True)
    ref = sgdlab.Adam(twin.parameters(), lr=0.01, foreach=False)

    def train_step(net, optimizer, x, y):
        loss = (net(x) - y).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    compiled = torch.compile(train_step)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(16, 4, generator=g, dtype=torch.float64)
        y = torch.randn(16, 1, generator=g, dtype=torch.float64)
        a = compiled(model, opt, x, y)
        b = train_step(twin, ref, x, y)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.max(torch.abs(p - q)).item() <= 1e-12
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), start)) > 1e-3
    assert any(k[0] == "adam" and k[3] == torch.float64 for k in _fast.COMPILE_SECONDS)


def test_compilation_failure_falls_back_to_eager_kernels_with_one_warning():
    """Without a usable C++ compiler inductor cannot build a CPU kernel: the fused step warns
    once, runs the same kernel eagerly on the flat buffers, and still equals the reference."""
    import torch._inductor.config as inductor_config

    kwargs = dict(lr=0.01, maximize=True, eps=1e-3, eps_placement="inside", power=0.75)
    ref_p, fu_p = make_params(5), make_params(5)
    ref = sgdlab.RMSProp(ref_p, foreach=False, **kwargs)
    fu = sgdlab.RMSProp(fu_p, fused=True, **kwargs)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        with pytest.warns(RuntimeWarning, match="torch.compile failed.*C\\+\\+ compiler"):
            for t in range(3):
                set_grads(ref_p, t)
                set_grads(fu_p, t)
                ref.step()
                fu.step()
        assert not _fast.compile_enabled()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            set_grads(ref_p, 3)
            set_grads(fu_p, 3)
            ref.step()
            fu.step()
    for a, b in zip(ref_p, fu_p):
        assert torch.max(torch.abs(a - b)).item() <= 1e-12


_COMPILE_ONE_STEP = """
import sys, torch, sgdlab
torch.set_num_threads(int(sys.argv[1]))
p = torch.zeros(4096, requires_grad=True)
p.grad = torch.ones(4096)
sgdlab.Adam([p], lr=0.1, fused=True).step()
assert torch.allclose(p, torch.full_like(p, -0.1))
"""


def test_kernel_compiled_with_one_thread_is_not_reused_with_two(tmp_path):
    """Inductor writes the thread count into a CPU kernel's OpenMP loops but keeps it out of
    its on-disk cache key unless it is set: a kernel first compiled by a one-thread process
    (a data-loader worker) must not be what a two-thread process runs (it ran the step on one
    core, about 2x slower). Two processes share a fresh cache directory."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), SGDLAB_FUSED_COMPILE="1",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # fmt: skip
    for threads in ("1", "2"):
        subprocess.run([sys.executable, "-c", _COMPILE_ONE_STEP, threads], env=env, check=True,
                       timeout=600)  # fmt: skip
    generated = [f for f in tmp_path.rglob("*") if f.is_file() and f.suffix in (".py", ".cpp")]
    assert any("num_threads(2)" in f.read_text(errors="ignore") for f in generated)
