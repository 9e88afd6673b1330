"""The lecture's three forms of momentum coincide in float64 (REFERENCE.md "Momentum forms"):

v = (1 - 1/N_g) v + eta g,  Phi -= v
Phi -= N_g eta mu,  mu = (1 - 1/N_g) mu + (1/N_g) g     (mu_0 = 0)
torch.optim.SGD(lr=eta, momentum=1 - 1/N_g)  ==  sgdlab.SGD(...)
"""

from __future__ import annotations

import pytest
import torch

import sgdlab


def _grad(phi: torch.Tensor, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(t)
    return torch.tanh(phi) * torch.tensor([1.0, 3.0, 0.5], dtype=phi.dtype) + 0.3 * torch.randn(
        3, generator=g, dtype=phi.dtype
    )


@pytest.mark.parametrize("n_g", [1.0, 2.0, 10.0, 37.5])
def test_three_forms_coincide(n_g):
    eta = 0.02
    start = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    beta = 1.0 - 1.0 / n_g

    phi_v, v = start.clone(), torch.zeros(3, dtype=torch.float64)
    phi_mu, mu = start.clone(), torch.zeros(3, dtype=torch.float64)
    p_t = start.clone().requires_grad_()
    p_s = start.clone().requires_grad_()
    opt_t = torch.optim.SGD([p_t], lr=eta, momentum=beta)
    opt_s = sgdlab.SGD([p_s], lr=eta, momentum=beta)
    for t in range(300):
        v = beta * v + eta * _grad(phi_v, t)
        phi_v = phi_v - v
        mu = beta * mu + (1.0 / n_g) * _grad(phi_mu, t)
        phi_mu = phi_mu - n_g * eta * mu
        p_t.grad = _grad(p_t.detach(), t)
        p_s.grad = _grad(p_s.detach(), t)
        opt_t.step()
        opt_s.step()
    for other in (phi_mu, p_t.detach(), p_s.detach()):
        assert torch.max(torch.abs(phi_v - other)).item() <= 1e-12
    assert torch.max(torch.abs(phi_v - start)).item() > 0.05


def test_conjugate_constructor_is_lecture_momentum():
    """SGD.from_conjugate(eta', N'_g, B) steps as Phi -= B eta' mu with N_g = max(1, N'_g/B)."""
    eta_p, n_gp, b = 1e-3, 320.0, 16
    start = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p = start.clone().requires_grad_()
    opt = sgdlab.SGD.from_conjugate([p], eta_prime=eta_p, n_g=n_gp, batch_size=b)
    n_g = n_gp / b
    phi, mu = start.clone(), torch.zeros(3, dtype=torch.float64)
    for t in range(100):
        mu = (1 - 1 / n_g) * mu + (1 / n_g) * _grad(phi, t)
        phi = phi - b * eta_p * mu
        p.grad = _grad(p.detach(), t)
        opt.step()
    assert torch.max(torch.abs(phi - p.detach())).item() <= 1e-12
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(b * eta_p / n_g, rel=1e-15)
    assert group["momentum"] == pytest.approx(1 - 1 / n_g, rel=1e-15)
