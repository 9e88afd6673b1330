"""Experiment 9: Adam with the published bias correction versus the lecture's 1/min(t, N).

Published (Kingma & Ba 2015): m_t = beta1 m + (1-beta1) g, v_t = beta2 v + (1-beta2) g^2,
Phi[i] -= lr m_t[i]/(1-beta1^t) / (sqrt(v_t[i]/(1-beta2^t)) + eps).
The lecture: mu_t = (1 - 1/min(t,N_g)) mu + g/min(t,N_g), s_t likewise with N_s,
Phi_t[i] -= lr mu_t[i]/(sqrt(s_t[i]) + eps) (the slide's "Phi_t" is a typo for "Phi_t[i]",
REFERENCE.md erratum 9), with N = 1/(1 - beta).

Both give mu_1 = g, s_1 = g^2 at t = 1, so the first step is the same, lr g/(|g| + eps): a
sign step of length lr when eps = 0. Afterwards the lecture's average is the exact mean of the
first t gradients (t <= N) while Adam's weights them geometrically; the trajectories part, and
we measure by how much on a real problem (logistic regression on sklearn's digits, float64).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...optim import Adam as SgdlabAdam
from ..claims import Claim
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from ._common import digits, with_curves

NAME = "adam_bias"
TITLE = "9. Adam: the published bias correction versus the lecture's 1/min(t, N)"
DESCRIPTION = (
    "Multinomial logistic regression on sklearn's digits in float64, trained with the same "
    "mini-batches by torch.optim.Adam, sgdlab.Adam with the published correction, sgdlab.Adam "
    "with the lecture's 1/min(t, N) correction and a hand-written per-coordinate version of the "
    "lecture's slide. The first three identities are exact (rounding level); the first step is "
    "the same sign step for both corrections; after it the two trajectories part, and the "
    "figure shows by how much, in parameters and in training loss."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {"beta1": Range(ge=0, lt=1), "beta2": Range(ge=0, lt=1)}

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 32
    steps: int = 300


PRESETS: dict[str, dict[str, Any]] = {"tiny": {"steps": 60}, "full": {"steps": 3000}}


def _loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(x @ w[:-1] + w[-1], y)


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    xn, yn = digits()
    x = torch.tensor(xn, dtype=torch.float64)
    y = torch.tensor(yn)
    gen = torch.Generator().manual_seed(config.seed)
    w0 = 0.01 * torch.randn(x.shape[1] + 1, 10, generator=gen, dtype=torch.float64)
    batches = [
        torch.randint(0, x.shape[0], (config.batch_size,), generator=gen)
        for _ in range(config.steps)
    ]
    betas = (config.beta1, config.beta2)
    params = {k: torch.nn.Parameter(w0.clone()) for k in ("torch", "published", "lecture")}
    opts = {
        "torch": torch.optim.Adam([params["torch"]], lr=config.lr, betas=betas, eps=config.eps),
        "published": SgdlabAdam(
            [params["published"]],
            lr=config.lr,
            betas=betas,
            eps=config.eps,
            bias_correction="published",
        ),
        "lecture": SgdlabAdam(
            [params["lecture"]],
            lr=config.lr,
            betas=betas,
            eps=config.eps,
            bias_correction="lecture",
        ),
    }
    # The slide, per coordinate i, by hand.
    phi = w0.clone()
    mu = torch.zeros_like(phi)
    s = torch.zeros_like(phi)
    n_g, n_s = 1 / (1 - config.beta1), 1 / (1 - config.beta2)
    dev = {"torch_vs_published": 0.0, "slide_vs_lecture": 0.0}
    trace = []
    first: dict[str, Any] = {}
    for t, idx in enumerate(bar(batches, desc=NAME), start=1):
        before = {k: p.detach().clone() for k, p in params.items()}
        for k, p in params.items():
            opts[k].zero_grad()
            _loss(p, x[idx], y[idx]).backward()
            opts[k].step()
        g = torch.func.grad(_loss)(phi, x[idx], y[idx])
        wg, ws = 1 / min(t, n_g), 1 / min(t, n_s)
        mu = (1 - wg) * mu + wg * g
        s = (1 - ws) * s + ws * g * g
        phi = phi - config.lr * mu / (s.sqrt() + config.eps)
        scale = float((params["torch"].detach() - w0).abs().max())
        dev["torch_vs_published"] = max(
            dev["torch_vs_published"],
            float((params["torch"].detach() - params["published"].detach()).abs().max()) / scale,
        )
        dev["slide_vs_lecture"] = max(
            dev["slide_vs_lecture"], float((params["lecture"].detach() - phi).abs().max()) / scale
        )
        if t == 1:
            step_p = params["published"].detach() - before["published"]
            step_l = params["lecture"].detach() - before["lecture"]
            nz = g != 0
            first = {
                "published_vs_lecture": float((step_p - step_l).abs().max()),
                "sign_step_dev": float(
                    (step_p[nz].abs() - config.lr * g[nz].abs() / (g[nz].abs() + config.eps))
                    .abs()
                    .max()
                ),
                "step_len_max": float(step_p.abs().max()),
            }
        if t == 1 or t % max(1, config.steps // 40) == 0 or t == config.steps:
            pp, pl = params["published"].detach(), params["lecture"].detach()
            with torch.no_grad():
                trace.append(
                    {
                        "t": t,
                        "rel_distance": float((pp - pl).norm() / (pp - w0).norm()),
                        "loss_published": float(_loss(pp, x, y)),
                        "loss_lecture": float(_loss(pl, x, y)),
                    }
                )
    return {"identities": dev, "first_step": first, "trace": trace, "lr": config.lr}


def claims(results: dict[str, Any]) -> list[Claim]:
    dev, first, last = results["identities"], results["first_step"], results["trace"][-1]
    rel_loss = abs(last["loss_lecture"] - last["loss_published"]) / last["loss_published"]
    return [
        Claim(
            "adam_bias.published_equals_torch",
            "sgdlab.Adam (published correction) is torch.optim.Adam (float64, whole run)",
            "max_t |Phi_sgdlab - Phi_torch| / |Phi - Phi_0| = 0",
            0.0,
            dev["torch_vs_published"],
            0.0,
            1e-10,
        ),
        Claim(
            "adam_bias.lecture_update",
            "sgdlab.Adam(bias_correction='lecture') is the slide, per coordinate: "
            "Phi_t[i] -= lr mu_t[i]/(sqrt(s_t[i]) + eps)",
            "max_t |Phi_sgdlab - Phi_slide| / |Phi - Phi_0| = 0",
            0.0,
            dev["slide_vs_lecture"],
            0.0,
            1e-10,
            erratum=9,
            lecture_formula="Phi_{t+1}[i] = Phi_t - ... (typo)",
        ),
        Claim(
            "adam_bias.same_first_step",
            "published and lecture corrections take the same first step",
            "mu_1 = m_1/(1-beta1) = g",
            0.0,
            first["published_vs_lecture"],
            0.0,
            1e-15,
        ),
        Claim(
            "adam_bias.sign_step",
            "the first step is a sign step: lr g/(|g| + eps)",
            "|Delta Phi_1[i]| = lr |g_i|/(|g_i| + eps)",
            0.0,
            first["sign_step_dev"],
            0.0,
            1e-12 * results["lr"],
        ),
        Claim(
            "adam_bias.trajectories_part",
            f"the two corrections give 'essentially the same effect': final training loss "
            f"differs by at most 5% (relative, t={last['t']})",
            "|L_lecture - L_published| / L_published",
            0.05,
            rel_loss,
            0.0,
            0.0,
            kind="at_most",
            exact=False,
            note=f"parameters part by {last['rel_distance']:.3g} of the distance travelled",
        ),
    ]


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    tr = results["trace"]
    t = [r["t"] for r in tr]
    fig, ax = figure(2, 1)
    ax[0, 0].plot(t, [r["rel_distance"] for r in tr], "o-", ms=3)
    ax[0, 0].set(
        xlabel="step",
        ylabel="|Phi_pub - Phi_lec| / |Phi_pub - Phi_0|",
        title="how far the trajectories part",
        yscale="log",
    )
    ax[0, 1].plot(t, [r["loss_published"] for r in tr], "-", label="published")
    ax[0, 1].plot(t, [r["loss_lecture"] for r in tr], "--", label="lecture 1/min(t,N)")
    ax[0, 1].set(xlabel="step", ylabel="training loss", yscale="log")
    ax[0, 1].legend(fontsize=8)
    return [save(fig, outdir, "adam_bias.png")]
