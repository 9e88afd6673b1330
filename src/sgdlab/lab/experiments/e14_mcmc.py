"""Experiment 14: SGD as MCMC: barrier escape, a learning-rate drop, snapshot ensembles.

1. Escape. SGD with constant eta on the double well L = (x^2 - 1)^2/4 with gradient noise of
   variance sigma^2 is, for small eta, the diffusion dX = -L' dt + sqrt(2T) dW with
   T = eta sigma^2/2 and t = sum of learning rates. The mean first-passage time from -1 to +1
   is given exactly by the double integral of :func:`sgdlab.dynamics.mean_first_passage_time`
   (66.27 at T = 0.1) and grows like exp(Delta L/T) = exp(2 Delta L/(eta sigma^2)) with
   Delta L = 1/4 (Kramers). We measure it on SGD chains at several temperatures.
2. A learning-rate drop by 10 (He et al. 2016 divide by 10: REFERENCE.md erratum 7). On a
   quadratic, E e^2(t) = V_new + (V_old - V_new)(1 - eta_new h)^(2t) exactly
   (:func:`sgdlab.dynamics.lr_drop_second_moment`). On logistic regression on sklearn's digits,
   the excess loss falls from about eta_old tr C/4 to eta_new tr C/4 (slope theorem).
3. Snapshot ensembles (Huang et al. 2017): a cyclic cosine schedule with M cycles, the softmax
   of the M end-of-cycle snapshots averaged, against one model trained with one cosine cycle on
   the same budget, on MNIST-1D.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...dynamics import (
    DoubleWell,
    LogisticRegression,
    Separable,
    estimate_mean,
    excess_loss_slope,
    lr_drop_second_moment,
    mean_first_passage_time,
    quadratic_variance,
    simulate_sgd,
)
from ..claims import Claim, tolerance
from ..config import ExperimentConfig, Range
from ..plotting import figure, save
from ..progress import bar
from . import _mnist
from ._common import chain_mean, digits, fit_loglog_slope, with_curves

NAME = "mcmc"
TITLE = "14. SGD as MCMC: barrier escape, a learning-rate drop, snapshot ensembles"
DESCRIPTION = (
    "(a) Mean escape time of SGD from the left well of (x^2-1)^2/4, in units of summed "
    "learning rates, against 1/T with T = eta sigma^2/2; the exact first-passage time of the "
    "Langevin diffusion (line) and the Kramers rate exp(Delta L/T) match the measurements. "
    "(b) After a learning-rate drop by 10, the excess loss relaxes to the new level: on a "
    "quadratic along the exact curve, on logistic regression on digits to about a tenth. (c) A "
    "snapshot ensemble from a cyclic schedule against one model with the same budget (test "
    "NLL of the first seed's snapshots; the claim averages over seeds). Error bars: two "
    "standard errors."
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    RANGES: ClassVar[Mapping[str, Range]] = {
        "escape_chains": Range(ge=2),
        "drop_chains": Range(ge=2),
        "logistic_chains": Range(ge=2),
        "l2": Range(ge=0),
        "snapshot_seeds": Range(ge=2),
    }

    temperatures: tuple[float, ...] = (0.1, 0.125, 0.15, 0.2)
    escape_lr: float = 0.01
    escape_chains: int = 1000
    drop_lr: float = 0.1
    drop_factor: float = 10.0
    drop_chains: int = 2000
    drop_steps: int = 300
    logistic_lr: float = 0.02
    logistic_steps: int = 1500
    logistic_chains: int = 100
    logistic_examples: int = 200
    l2: float = 0.5
    snapshot_cycles: int = 4
    snapshot_examples: int = 160000
    snapshot_lr: float = 0.1
    snapshot_seeds: int = 3
    batch_size: int = 64
    hidden: int = 96


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "temperatures": (0.125, 0.2),
        "escape_chains": 500,
        "drop_chains": 1000,
        "logistic_steps": 800,
        "logistic_chains": 60,
        "logistic_examples": 120,
        "snapshot_examples": 60000,
        "snapshot_cycles": 3,
        "snapshot_seeds": 2,
    },
    "full": {
        "temperatures": (0.08, 0.1, 0.125, 0.15, 0.2, 0.25),
        "escape_chains": 4000,
        "escape_lr": 0.005,
        "drop_chains": 10000,
        "logistic_steps": 6000,
        "logistic_chains": 200,
        "logistic_examples": 600,
        "snapshot_examples": 1200000,
        "snapshot_cycles": 5,
        "snapshot_seeds": 5,
    },
}


def _escape(config: Config, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows = []
    eta = config.escape_lr
    for temp in bar(config.temperatures, desc=f"{NAME} escape"):
        sigma = math.sqrt(2 * temp / eta)
        exact = mean_first_passage_time(DoubleWell.loss_numpy, temp, -1.0, 1.0)
        max_steps = int(12 * exact / eta)
        x = np.full(config.escape_chains, -1.0)
        hit = np.full(config.escape_chains, np.inf)
        alive = np.ones(config.escape_chains, bool)
        for k in range(1, max_steps + 1):
            xa = x[alive]
            xa = xa - eta * (xa**3 - xa + sigma * rng.standard_normal(xa.size))
            x[alive] = xa
            crossed = np.zeros_like(alive)
            crossed[alive] = xa >= 1.0
            hit[crossed] = k * eta
            alive &= ~crossed
            if not alive.any():
                break
        done = np.isfinite(hit)
        mean, se = chain_mean(np.where(done, hit, max_steps * eta))
        rows.append(
            {
                "T": temp,
                "sigma": sigma,
                "mfpt": mean,
                "mfpt_se": se,
                "exact": exact,
                "censored": int((~done).sum()),
            }
        )
    return rows


def _drop_quadratic(config: Config) -> dict[str, Any]:
    h, old = 1.0, config.drop_lr
    new = old / config.drop_factor
    p = Separable([h], [1.0])
    v_old = quadratic_variance(h, old, 1.0)
    rng = np.random.default_rng(config.seed)
    init = rng.normal(0.0, math.sqrt(v_old), (config.drop_chains, 1))
    res = simulate_sgd(
        p,
        new,
        1,
        config.drop_steps,
        config.drop_chains,
        init=init,
        record_every=max(1, config.drop_steps // 30),
        statistics=False,
        seed=config.seed,
    )
    traj = res.trajectory.numpy()[:, :, 0]
    steps = res.record_steps.numpy()
    e2 = [chain_mean(traj[i] ** 2) for i in range(len(steps))]
    return {
        "steps": steps,
        "e2": [m for m, _ in e2],
        "e2_se": [s for _, s in e2],
        "e2_exact": lr_drop_second_moment(steps, h, old, new, 1.0),
        "lr_old": old,
        "lr_new": new,
    }


def _drop_logistic(config: Config) -> dict[str, Any]:
    x, y = digits()
    rng = np.random.default_rng(config.seed)
    idx = rng.choice(x.shape[0], min(config.logistic_examples, x.shape[0]), replace=False)
    p = LogisticRegression(x[idx], (y[idx] >= 5).astype(float), l2=config.l2)
    out = {}
    for name, lr in (("old", config.logistic_lr), ("new", config.logistic_lr / config.drop_factor)):
        res = simulate_sgd(
            p,
            lr,
            1,
            config.logistic_steps,
            config.logistic_chains,
            burn_in=config.logistic_steps // 2,
            seed=config.seed + 7,
        )
        m, se = estimate_mean(res.excess_loss)
        out[name] = {"lr": lr, "excess": m, "excess_se": se}
    out["slope"] = excess_loss_slope(p.noise_covariance, 1)
    return out


def _snapshots(config: Config, outdir: Path) -> dict[str, Any]:
    """The snapshot ensemble against one model, over ``snapshot_seeds`` independent seeds: the
    test-NLL difference per seed, its mean and standard error over seeds."""
    data = _mnist.load(outdir, config.device)
    per_seed = [
        _snapshot_run(config, data, config.seed + 1000 * k) for k in range(config.snapshot_seeds)
    ]
    d_mean, d_se = chain_mean([r["nll_diff"] for r in per_seed])
    first = per_seed[0]
    return {
        **first,
        "nll_diff": d_mean,
        "nll_diff_se": d_se,
        "seeds": config.snapshot_seeds,
        "per_seed": per_seed,
        "ensemble_nll": float(np.mean([r["ensemble_nll"] for r in per_seed])),
        "single_nll": float(np.mean([r["single_nll"] for r in per_seed])),
        "ensemble_acc": float(np.mean([r["ensemble_acc"] for r in per_seed])),
        "single_acc": float(np.mean([r["single_acc"] for r in per_seed])),
    }


def _snapshot_run(config: Config, data: _mnist.Data, seed: int) -> dict[str, Any]:
    steps = config.snapshot_examples // config.batch_size
    cycle = steps / config.snapshot_cycles
    lr0 = config.snapshot_lr

    def cyclic(t: int) -> float:
        return 0.5 * lr0 * (1 + math.cos(math.pi * ((t + 1) % cycle) / cycle))

    def single(t: int) -> float:
        return 0.5 * lr0 * (1 + math.cos(math.pi * t / steps))

    probs: list[torch.Tensor] = []

    def snap(step: int, model: torch.nn.Module) -> None:  # called at the end of each cycle
        with torch.no_grad():
            probs.append(torch.softmax(model(data.x_test), 1))

    model = _mnist.mlp(config.hidden, seed, config.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=0.9)
    _mnist.train(
        model,
        opt,
        data,
        config.batch_size,
        config.snapshot_examples,
        seed=seed,
        lr_at=cyclic,
        evals=config.snapshot_cycles,
        on_eval=snap,
    )
    ens = torch.stack(probs).mean(0)
    nll_ens = torch.nn.functional.nll_loss(
        ens.clamp_min(1e-12).log(), data.y_test, reduction="none"
    )
    members = [_mnist.evaluate(model, data.x_test, data.y_test)]
    single_model = _mnist.mlp(config.hidden, seed, config.device)
    opt = torch.optim.SGD(single_model.parameters(), lr=lr0, momentum=0.9)
    _mnist.train(
        single_model,
        opt,
        data,
        config.batch_size,
        config.snapshot_examples,
        seed=seed,
        lr_at=single,
        evals=4,
    )
    with torch.no_grad():
        logp = torch.log_softmax(single_model(data.x_test), 1)
    nll_single = torch.nn.functional.nll_loss(logp, data.y_test, reduction="none")
    diff = (nll_ens - nll_single).cpu().numpy()
    return {
        "snapshots": len(probs),
        "ensemble_nll": float(nll_ens.mean()),
        "single_nll": float(nll_single.mean()),
        "nll_diff": float(diff.mean()),
        "ensemble_acc": float((ens.argmax(1) == data.y_test).float().mean()),
        "single_acc": float((logp.argmax(1) == data.y_test).float().mean()),
        "last_snapshot_nll": members[0][0],
        "member_nll": [
            float(torch.nn.functional.nll_loss(p.clamp_min(1e-12).log(), data.y_test))
            for p in probs
        ],
    }


@with_curves
def run(config: Config, outdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(config.seed)
    return {
        "escape": _escape(config, rng),
        "drop_quadratic": _drop_quadratic(config),
        "drop_logistic": _drop_logistic(config),
        "snapshots": _snapshots(config, outdir),
        "escape_lr": config.escape_lr,
        "drop_factor": config.drop_factor,
    }


def claims(results: dict[str, Any]) -> list[Claim]:
    out = []
    esc = results["escape"]
    eta = results["escape_lr"]
    for r in esc:
        model = 0.05 * r["exact"]
        out.append(
            Claim(
                f"mcmc.escape_T{r['T']:g}",
                f"SGD escape time from the left well at T = eta sigma^2/2 "
                f"= {r['T']:g} equals the diffusion's exact first-passage time",
                "MFPT = int int exp((L(y) - L(z))/T)/T",
                r["exact"],
                r["mfpt"],
                r["mfpt_se"],
                tolerance(r["mfpt_se"], model_error=model),
                exact=False,
                note=f"5% allowed for the O(eta) discretisation; {r['censored']} chains censored",
            )
        )
    if len(esc) >= 2:
        inv_t = [1 / r["T"] for r in esc]
        slope, se = fit_loglog_slope(np.exp(inv_t), [r["mfpt"] for r in esc])
        slope_exact, _ = fit_loglog_slope(np.exp(inv_t), [r["exact"] for r in esc])
        out.append(
            Claim(
                "mcmc.arrhenius",
                "escape time grows like exp(2 Delta L/(eta sigma^2)) = "
                "exp(Delta L/T), Delta L = 1/4",
                "d log MFPT / d(1/T) (exact MFPT fitted alike)",
                slope_exact,
                slope,
                se,
                tolerance(se, model_error=0.05),
                exact=False,
                note=f"Kramers' asymptotic value Delta L = 0.25; eta = {eta:g}",
            )
        )
    dq = results["drop_quadratic"]
    for i in (len(dq["steps"]) // 4, len(dq["steps"]) - 1):
        out.append(
            Claim(
                f"mcmc.drop_quadratic_t{int(dq['steps'][i])}",
                f"after the drop eta {dq['lr_old']:g} -> {dq['lr_new']:g}: E e^2 at step "
                f"{int(dq['steps'][i])}",
                "V_new + (V_old - V_new)(1 - eta_new h)^(2t)",
                dq["e2_exact"][i],
                dq["e2"][i],
                dq["e2_se"][i],
                tolerance(dq["e2_se"][i]),
            )
        )
    dl = results["drop_logistic"]
    ratio = dl["new"]["excess"] / dl["old"]["excess"]
    ratio_se = ratio * math.hypot(
        dl["new"]["excess_se"] / dl["new"]["excess"], dl["old"]["excess_se"] / dl["old"]["excess"]
    )
    f = results["drop_factor"]
    out.append(
        Claim(
            "mcmc.lr_drop_level",
            f"logistic regression on digits: dropping the lr by {f:g} lowers "
            f"the excess loss to about 1/{f:g} (L(eta) ≈ L* + eta tr C/4)",
            "excess(eta/10)/excess(eta) = 1/10 + O(eta)",
            1 / f,
            ratio,
            ratio_se,
            tolerance(ratio_se, model_error=0.03),
            exact=False,
            erratum=7,
            lecture_formula="drop by 2 (slide); He et al. drop by 10",
            lecture_value=0.5,
            note=f"levels {dl['old']['excess']:.3g} -> {dl['new']['excess']:.3g}",
        )
    )
    sn = results["snapshots"]
    out.append(
        Claim(
            "mcmc.snapshot_ensemble",
            f"a snapshot ensemble ({sn['snapshots']} snapshots, cyclic "
            "schedule) has lower test NLL than one model with the same budget",
            "NLL_ensemble - NLL_single < 0 (decided beyond 4 s.e.)",
            0.0,
            sn["nll_diff"],
            sn["nll_diff_se"],
            tolerance(0.0, k=0.0),
            kind="at_most",
            exact=False,
            seeds=int(sn.get("seeds", 1)),
            inconclusive=""
            if abs(sn["nll_diff"]) > 4 * sn["nll_diff_se"]
            else f"difference within 4 s.e. ({sn['nll_diff_se']:.2g}) of 0",
            note=f"accuracy {sn['ensemble_acc']:.3f} (ensemble) vs {sn['single_acc']:.3f}, mean "
            "over seeds",
        )
    )
    return out


def plot(results: dict[str, Any], outdir: Path) -> list[str]:
    fig, ax = figure(3, 1, width=4.2)
    esc = results["escape"]
    a = ax[0, 0]
    inv = [1 / r["T"] for r in esc]
    a.errorbar(
        inv, [r["mfpt"] for r in esc], [2 * r["mfpt_se"] for r in esc], fmt="o", label="SGD chains"
    )
    a.plot(inv, [r["exact"] for r in esc], "-", label="exact MFPT")
    a.set(yscale="log", xlabel="1/T", ylabel="escape time (sum of lrs)", title="double well")
    a.legend(fontsize=7)
    dq = results["drop_quadratic"]
    a = ax[0, 1]
    a.errorbar(dq["steps"], dq["e2"], 2 * np.asarray(dq["e2_se"]), fmt="o", ms=3, label="measured")
    a.plot(dq["steps"], dq["e2_exact"], "-", label="exact")
    a.set(
        xlabel="steps after the drop",
        ylabel="E e^2",
        yscale="log",
        title=f"lr drop by {results['drop_factor']:g}",
    )
    a.legend(fontsize=7)
    sn = results["snapshots"].get("per_seed", [results["snapshots"]])[0]
    a = ax[0, 2]
    a.bar(range(len(sn["member_nll"])), sn["member_nll"], label="snapshots")
    a.axhline(sn["ensemble_nll"], color="C1", label="ensemble")
    a.axhline(sn["single_nll"], color="C2", ls="--", label="single model")
    a.set(xlabel="snapshot", ylabel="test NLL", title="snapshot ensemble (MNIST-1D, seed 1)")
    a.legend(fontsize=7)
    return [save(fig, outdir, "mcmc.png")]
