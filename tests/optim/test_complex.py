"""Complex parameters step as in torch.optim, which views them as pairs of reals
(``torch.view_as_real``): complex128 twins on every path.

RMSProp and Adam squared ``g*g`` (a complex square) where torch squares the real and the
imaginary part each: ``RMSProp([1+1j], lr=0.01)`` with gradient ``0.5+2j`` moved the imaginary
part to 0.99999999 instead of torch's 0.9, and AMSGrad crashed (no maximum of complex numbers).
"""

from __future__ import annotations

import pytest
import torch

import sgdlab

from .cases import TORCH_TWINS, make_params, param_groups, state_tensors

PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True), dict(capturable=True)]
PATH_IDS = ["reference", "foreach", "fused", "capturable"]


def complex_params(seed: int) -> list[torch.Tensor]:
    """The shapes of :func:`make_params` as complex128, the last one left real (a group mixing
    both)."""
    re, im = make_params(seed), make_params(seed + 7)
    out = [torch.complex(a.detach(), b.detach()).requires_grad_() for a, b in zip(re, im)]
    out[-1] = re[-1]
    return out


def set_grads(params: list[torch.Tensor], t: int) -> None:
    """Bounded, parameter-dependent gradients with noise (``sin`` of each part: ``sin`` of a
    complex number grows without bound)."""
    g = torch.Generator().manual_seed(1000 + t)
    for p in params:
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        x = p.detach()
        pull = torch.complex(x.real.sin(), x.imag.sin()) if x.is_complex() else x.sin()
        p.grad = pull + 0.5 * noise


@pytest.mark.usefixtures("eager_kernels")
@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("name,cls,tcls,kwargs", TORCH_TWINS, ids=[c[0] for c in TORCH_TWINS])
def test_complex_parameters_match_torch(name, cls, tcls, kwargs, path):
    if path.get("capturable") and cls is sgdlab.SGD:
        pytest.skip("SGD has no capturable mode")
    ours_p, theirs_p = complex_params(0), complex_params(0)
    ours = cls(param_groups(ours_p, cls), **path, **kwargs)
    theirs = tcls(param_groups(theirs_p, cls), foreach=False, **kwargs)
    for t in range(60):
        set_grads(ours_p, t)
        set_grads(theirs_p, t)
        ours.step()
        theirs.step()
    for a, b in zip(ours_p, theirs_p):
        assert (a - b).abs().max().item() <= 1e-12
    s_ours, s_theirs = state_tensors(ours), state_tensors(theirs)
    for key, value in s_theirs.items():
        assert (s_ours[key] - value).abs().max().item() <= 1e-12, key
    assert max((a - b).abs().max().item() for a, b in zip(ours_p, complex_params(0))) > 1e-2


@pytest.mark.parametrize("cls", [sgdlab.RMSProp, sgdlab.Adam], ids=["rmsprop", "adam"])
def test_the_reported_step(cls):
    """The report's numbers: one step from 1+1j with gradient 0.5+2j (lr 0.01) moves each part
    by its own first step, as for two real parameters: RMSProp ``lr g / sqrt((1 - alpha) g^2)``
    = 0.1, Adam ``lr g / |g|`` = 0.01 (sgdlab moved the imaginary part by 1e-8 before)."""
    a = torch.tensor([1 + 1j], dtype=torch.complex128, requires_grad=True)
    opt = cls([a], lr=0.01, **({"amsgrad": True} if cls is sgdlab.Adam else {}))
    a.grad = torch.tensor([0.5 + 2j], dtype=torch.complex128)
    opt.step()
    move = 0.1 if cls is sgdlab.RMSProp else 0.01
    assert torch.allclose(
        a.detach(),
        torch.tensor([1 - move + (1 - move) * 1j], dtype=torch.complex128),
        atol=1e-6,
        rtol=0,
    )


def test_per_example_second_moment_refuses_complex_before_any_change():
    p = torch.ones(2, dtype=torch.complex128, requires_grad=True)
    q = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = sgdlab.Adam([q, p], second_moment="per_example")
    for t in (p, q):
        t.grad = torch.ones_like(t)
        t.grad_second_moment = torch.ones_like(t)
    with pytest.raises(ValueError, match=r"per_example' takes real parameters.*complex128"):
        opt.step()
    assert torch.equal(q.detach(), torch.ones(2, dtype=torch.float64)) and len(opt.state) == 0
