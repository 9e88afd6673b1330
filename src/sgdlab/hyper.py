r"""The hyperparameter algebra: conjugate (per-example) units and batch-size scaling rules.

The lecture ("Scaling eta and N_g with batch size", "Putting it together") argues that SGD is
least perturbed by a change of batch size ``B`` when the hyperparameters are counted *per
example* rather than per step:

* ``eta_prime`` (eta'): the per-example learning rate. One step on a batch of ``B`` examples
  moves the parameters by ``eta_eff = B * eta'`` per unit of *averaged* update direction
  (the lecture's ``eta = B eta'``, from two steps at ``B = 1`` being one step at ``B = 2``).
* ``n_g`` (N'_g): the momentum horizon counted in examples. A running average over ``N_g``
  steps of batch ``B`` averages ``N_g B`` gradients, so ``N_g = N'_g / B``.
* ``n_s`` (N'_s): the same for the second-moment average of RMSProp/Adam.

Per-step hyperparameters are what torch optimizers take: ``lr``, a momentum coefficient
``beta1`` (``momentum`` in SGD/RMSProp, ``betas[0]`` in Adam), ``beta2`` (``alpha`` in
RMSProp, ``betas[1]`` in Adam) and ``eps``; a horizon N in steps is ``1 / (1 - beta)``.

Two momentum forms relate ``lr`` to the step per unit of averaged direction ``eta_eff``:

* ``"ema"``: the update uses the normalised average ``mu`` (Adam: ``Phi -= lr * m_hat``), so
  ``eta_eff = lr``.
* ``"heavy_ball"``: the update uses ``v = beta v + g`` (torch SGD and RMSprop momentum,
  dampening 0), which is ``N_g mu``; so ``eta_eff = N_g * lr`` and ``lr = eta_eff / N_g`` (the
  lecture's ``eta = eta' / N_g``).

Scaling rules (``k = B / B0`` when moving a configuration from ``B0`` to ``B``):

========== ======================= ======================================= =================
rule       eta_eff(B)              horizon in steps N(B)                   eps(B)
========== ======================= ======================================= =================
lecture    B eta'                  max(1, N'/B)   (erratum 1: min -> max)   eps'
exact      B eta'                  1 / (1 - (1 - 1/N')^B)  (beta_B=beta^B)  eps'
sqrt       sqrt(B) eta'            N'/B while >= 2 (1 - beta scales by k),  eps' / sqrt(B)
                                   then beta_B = (1/2)^(2B/N')  (see below)
linear     B eta'                  N'             (betas unchanged)        eps'
========== ======================= ======================================= =================

``lecture`` is the lecture's "putting it together" with its ``min`` corrected to ``max``
(REFERENCE.md erratum 1). ``exact`` keeps the per-example decay of the average exactly
(Busbridge et al. 2023, "How to scale your EMA"). ``sqrt`` is the square-root rule for
adaptive methods (Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient
algorithms"): it keeps RMSProp/Adam with the batch-mean second moment invariant. ``linear``
is the linear scaling rule (Goyal et al. 2017).

The square-root rule's ``1 - beta_B = (B/B0) (1 - beta)`` (``beta_B = 1 - B/N'``) reaches
``beta = 0`` at ``B = N'`` and is negative beyond. sgdlab follows it while the horizon is at
least 2 steps (``beta_B >= 1/2``, ``B <= B* = N'/2``) and beyond ``B*`` moves beta as the
``exact`` rule does from there: ``beta_B = beta*^(B/B*)``, ``beta* = 1 - B*/N'``, that is
``(1/2)^(2B/N')`` (for ``N' < 2``: ``B* = 1``, the exact rule ``(1 - 1/N')^B``). beta stays in
(0, 1), is continuous in ``B`` and the map stays invertible; the first use of this branch in
a process warns (:class:`UserWarning`). Example: ``beta = 0.9`` at ``B0 = 32`` (``N' = 320``)
is 0.6 at 128, 0.2 at 256 in the linear form; with the switch at ``B* = 160`` it is
``0.5^(256/160) = 0.330`` at 256 and ``0.5^3.2 = 0.109`` at 512 (the linear form: 0, clamped).

Conjugate units are defined at ``B = 1``:
``to_per_step(c, 1, rule)`` gives ``lr = eta'`` (ema form), ``N = N'`` for every rule.

A horizon of exactly 1 (no averaging, e.g. ``momentum = 0``) stays 1 at every batch size: a
configuration without momentum never acquires momentum by rescaling. For ``lecture`` the map
``N' -> N(B)`` is clamped at 1, so ``to_conjugate`` returns the canonical ``N' = N * B``
(``N > 1``), and conjugate -> per-step -> conjugate is the identity only where ``N' >= B`` or
``N' = 1``. Per-step -> conjugate -> per-step is always the identity.

Example::

    >>> from sgdlab import hyper
    >>> c = hyper.Conjugate(eta_prime=1e-3, n_g=1000.0)
    >>> s = hyper.to_per_step(c, batch_size=100, rule="lecture", momentum_form="heavy_ball")
    >>> round(s.lr, 12), round(s.beta1, 12)
    (0.01, 0.9)
    >>> s256 = hyper.rescale(s, 100, 200, rule="lecture", momentum_form="heavy_ball")
    >>> round(s256.lr, 12), round(s256.beta1, 12)
    (0.04, 0.8)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

from sgdlab._validation import (
    check_batch_size,
    check_choice,
    check_horizon,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)

__all__ = [
    "RULES",
    "MOMENTUM_FORMS",
    "Conjugate",
    "PerStep",
    "beta_to_horizon",
    "horizon_to_beta",
    "steps_horizon",
    "examples_horizon",
    "steps_decay",
    "examples_horizon_of_decay",
    "lr_multiplier",
    "eps_multiplier",
    "to_per_step",
    "to_conjugate",
    "rescale",
    "per_example_gain",
    "per_example_kwargs",
]


RULES: tuple[str, ...] = ("lecture", "exact", "sqrt", "linear")
MOMENTUM_FORMS: tuple[str, ...] = ("ema", "heavy_ball")


@dataclass(frozen=True)
class Conjugate:
    """Hyperparameters in the lecture's conjugate (per-example) units, defined at ``B = 1``.

    Attributes:
        eta_prime: per-example learning rate eta' (> 0): step per example per unit of
            averaged update direction.
        n_g: momentum horizon N'_g in examples (>= 1; 1 = no momentum).
        n_s: second-moment horizon N'_s in examples (>= 1), for RMSProp/Adam.
        eps: the denominator's epsilon at ``B = 1`` (>= 0); only the ``sqrt`` rule moves it.
    """

    eta_prime: float
    n_g: float = 1.0
    n_s: float = 1.0
    eps: float = 0.0

    def __post_init__(self) -> None:
        # stored as Python floats (numpy or torch scalars would travel into param groups)
        object.__setattr__(self, "eta_prime", check_positive("eta_prime", self.eta_prime))
        object.__setattr__(self, "n_g", float(check_horizon("n_g", self.n_g)))
        object.__setattr__(self, "n_s", float(check_horizon("n_s", self.n_s)))
        object.__setattr__(self, "eps", check_nonnegative("eps", self.eps))


@dataclass(frozen=True)
class PerStep:
    """Per-step hyperparameters as torch optimizers take them.

    Attributes:
        lr: learning rate per step (> 0).
        beta1: first-moment decay (SGD/RMSProp ``momentum``, Adam ``betas[0]``), 0 <= . < 1.
        beta2: second-moment decay (RMSProp ``alpha``, Adam ``betas[1]``), 0 <= . < 1.
        eps: denominator epsilon (>= 0).
    """

    lr: float
    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0

    def __post_init__(self) -> None:
        # stored as Python floats (numpy or torch scalars would travel into param groups)
        object.__setattr__(self, "lr", check_positive("lr", self.lr))
        object.__setattr__(self, "beta1", check_unit_interval("beta1", self.beta1))
        object.__setattr__(self, "beta2", check_unit_interval("beta2", self.beta2))
        object.__setattr__(self, "eps", check_nonnegative("eps", self.eps))


#: rules whose switch to a limiting form has already been warned about in this process
_WARNED: set[str] = set()


def _sqrt_switch(n: float) -> float:
    """``B* = max(1, N'/2)``: the batch size beyond which the sqrt rule's beta follows the
    exact rule (its linear form would give a horizon under 2 steps, beta < 1/2)."""
    return max(1.0, n / 2.0)


def _sqrt_log_decay(n: float, b: int) -> float:
    """``log beta_B`` in the sqrt rule's exact branch (``B > B*``): ``(B/B*) log(1 - B*/N')``."""
    b_star = _sqrt_switch(n)
    if b > n / 2.0:
        _warn_once(
            "sqrt",
            f"scaling rule 'sqrt': at batch size {b} its linear form 1 - (1 - beta) k leaves a "
            f"horizon under 2 steps (N' = {n:.6g} examples); beyond B* = max(1, N'/2) beta "
            "follows the exact rule beta^(B/B*), in (0, 1) (see sgdlab.hyper)",
        )
    return (b / b_star) * math.log1p(-b_star / n)


def _sqrt_examples_horizon(beta: float, b: int) -> float:
    """Inverse of the sqrt rule's decay at batch size ``B`` for ``0 < beta < 1/2`` (the exact
    branch): ``N' = 2 B log 2 / -log beta`` where ``N' >= 2``, else ``1 / (1 - beta^(1/B))``."""
    log_beta = math.log(beta)
    if log_beta >= b * math.log(0.5):
        return 2.0 * b * math.log(2.0) / -log_beta
    return 1.0 / -math.expm1(log_beta / b)


def _warn_once(rule: str, message: str) -> None:
    if rule not in _WARNED:
        _WARNED.add(rule)
        warnings.warn(message, UserWarning, stacklevel=3)


def _rule(rule: str) -> str:
    return check_choice("rule", rule, RULES)


def _form(form: str) -> str:
    return check_choice("momentum_form", form, MOMENTUM_FORMS)


def beta_to_horizon(beta: float) -> float:
    """Horizon ``N = 1 / (1 - beta)`` of an average with decay ``beta`` (0 <= beta < 1)."""
    beta = check_unit_interval("beta", beta)
    return 1.0 / (1.0 - beta)


def horizon_to_beta(n: float) -> float:
    """Decay ``beta = 1 - 1/N`` of an average with horizon ``N >= 1``."""
    n = check_horizon("horizon", n)
    return 1.0 - 1.0 / n


def steps_horizon(n_examples: float, batch_size: int, rule: str) -> float:
    """Horizon in steps ``N(B)`` of an average whose horizon in examples is ``N'``.

    ``lecture``: ``max(1, N'/B)``; ``sqrt``: ``N'/B`` for ``B <= N'/2``, beyond it the exact
    branch of the module docstring; ``exact``: ``1/(1 - (1 - 1/N')^B)``; ``linear``: ``N'``.
    A horizon of 1 stays 1 under every rule.
    """
    n = check_horizon("n_examples", n_examples)
    b = check_batch_size("batch_size", batch_size)
    rule = _rule(rule)
    if n == 1.0:
        return 1.0
    if rule == "sqrt" and b > _sqrt_switch(n):
        return 1.0 / -math.expm1(_sqrt_log_decay(n, b))
    if rule in ("lecture", "sqrt"):
        return max(1.0, n / b)
    if rule == "exact":
        # 1 - (1 - 1/N')^B computed without cancellation.
        return 1.0 / -math.expm1(b * math.log1p(-1.0 / n))
    return n


def examples_horizon(n_steps: float, batch_size: int, rule: str) -> float:
    """Inverse of :func:`steps_horizon`: the horizon in examples ``N'`` given ``N(B)``.

    Where ``steps_horizon`` is clamped (``lecture`` with ``N = 1``) the canonical
    preimage ``N' = 1`` is returned; otherwise ``N' = N B`` (``lecture``; ``sqrt`` for
    ``N >= 2``), ``1 / (1 - beta_B^(1/B))`` (``exact``) or ``N`` (``linear``).
    """
    n = check_horizon("n_steps", n_steps)
    b = check_batch_size("batch_size", batch_size)
    rule = _rule(rule)
    if n == 1.0:
        return 1.0
    if rule == "sqrt" and n < 2.0:
        return _sqrt_examples_horizon(1.0 - 1.0 / n, b)
    if rule in ("lecture", "sqrt"):
        return n * b
    if rule == "exact":
        # beta_1 = beta_B^(1/B); 1 - beta_1 = -expm1(log(beta_B)/B).
        return 1.0 / -math.expm1(math.log1p(-1.0 / n) / b)
    return n


def steps_decay(n_examples: float, batch_size: int, rule: str) -> float:
    """Per-step decay ``beta(B) = 1 - 1/N(B)`` for a horizon of ``N'`` examples.

    Computed directly (``exact``: ``exp(B log(1 - 1/N'))``) so that a decay far below 1 keeps
    its digits, which ``1 - 1/N(B)`` would lose.
    """
    n = check_horizon("n_examples", n_examples)
    b = check_batch_size("batch_size", batch_size)
    rule = _rule(rule)
    if n == 1.0:
        return 0.0
    if rule == "exact":
        return math.exp(b * math.log1p(-1.0 / n))
    if rule == "sqrt" and b > _sqrt_switch(n):
        return math.exp(_sqrt_log_decay(n, b))
    return 1.0 - 1.0 / steps_horizon(n, b, rule)


def examples_horizon_of_decay(beta: float, batch_size: int, rule: str) -> float:
    """Inverse of :func:`steps_decay`: the horizon in examples ``N'`` of a per-step decay
    ``beta`` used at batch size ``B`` (``beta = 0`` maps to ``N' = 1``)."""
    beta = check_unit_interval("beta", beta)
    b = check_batch_size("batch_size", batch_size)
    rule = _rule(rule)
    if beta == 0.0:
        return 1.0
    if rule == "exact":
        return 1.0 / -math.expm1(math.log(beta) / b)
    if rule == "sqrt" and beta < 0.5:
        return _sqrt_examples_horizon(beta, b)
    return examples_horizon(1.0 / (1.0 - beta), b, rule)


def lr_multiplier(batch_size: int, rule: str) -> float:
    """``eta_eff(B) / eta'``: ``sqrt(B)`` for the ``sqrt`` rule, ``B`` for the others."""
    b = check_batch_size("batch_size", batch_size)
    return math.sqrt(b) if _rule(rule) == "sqrt" else float(b)


def eps_multiplier(batch_size: int, rule: str) -> float:
    """``eps(B) / eps'``: ``1/sqrt(B)`` for the ``sqrt`` rule, 1 for the others."""
    b = check_batch_size("batch_size", batch_size)
    return 1.0 / math.sqrt(b) if _rule(rule) == "sqrt" else 1.0


def to_per_step(
    conj: Conjugate,
    batch_size: int,
    rule: str = "lecture",
    momentum_form: str = "ema",
) -> PerStep:
    """Per-step hyperparameters at batch size ``B`` from conjugate units, under ``rule``.

    ``lr = eta_eff(B)`` in the ``ema`` form and ``eta_eff(B) / N_g(B)`` in the
    ``heavy_ball`` form; ``beta = 1 - 1/N(B)`` with ``N(B) = steps_horizon(N', B, rule)``
    (computed by :func:`steps_decay`).
    """
    if not isinstance(conj, Conjugate):
        raise TypeError(f"conj must be a hyper.Conjugate, got {type(conj).__name__}")
    b = check_batch_size("batch_size", batch_size)
    rule = _rule(rule)
    form = _form(momentum_form)
    beta1 = steps_decay(conj.n_g, b, rule)
    beta2 = steps_decay(conj.n_s, b, rule)
    eta_eff = lr_multiplier(b, rule) * conj.eta_prime
    lr = eta_eff * (1.0 - beta1) if form == "heavy_ball" else eta_eff
    return PerStep(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=conj.eps * eps_multiplier(b, rule),
    )


def to_conjugate(
    step: PerStep,
    batch_size: int,
    rule: str = "lecture",
    momentum_form: str = "ema",
) -> Conjugate:
    """Conjugate units from per-step hyperparameters used at batch size ``B``: the inverse
    of :func:`to_per_step` (see the module docstring for the clamped case)."""
    if not isinstance(step, PerStep):
        raise TypeError(f"step must be a hyper.PerStep, got {type(step).__name__}")
    b = check_batch_size("batch_size", batch_size)
    rule = _rule(rule)
    form = _form(momentum_form)
    eta_eff = step.lr / (1.0 - step.beta1) if form == "heavy_ball" else step.lr
    return Conjugate(
        eta_prime=eta_eff / lr_multiplier(b, rule),
        n_g=examples_horizon_of_decay(step.beta1, b, rule),
        n_s=examples_horizon_of_decay(step.beta2, b, rule),
        eps=step.eps / eps_multiplier(b, rule),
    )


def rescale(
    step: PerStep,
    from_batch_size: int,
    to_batch_size: int,
    rule: str = "lecture",
    momentum_form: str = "ema",
) -> PerStep:
    """Move per-step hyperparameters tuned at ``from_batch_size`` (B0) to ``to_batch_size``.

    Equivalent to ``to_per_step(to_conjugate(step, B0), B)``; returns ``step`` unchanged
    (bit for bit) when ``B == B0``. With ``k = B / B0``: ``linear`` multiplies ``lr`` by ``k``
    (ema form); ``sqrt`` multiplies ``lr`` by ``sqrt(k)``, ``1 - beta`` by ``k`` while beta
    stays >= 1/2 (beyond: the exact branch of the module docstring, with a warning) and
    ``eps`` by ``1/sqrt(k)``; ``exact`` maps ``beta -> beta^k``.

    Example:
        >>> from sgdlab.hyper import PerStep, rescale
        >>> s = rescale(PerStep(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8), 32, 128, "sqrt")
        >>> round(s.lr, 12), round(s.beta1, 12), round(s.beta2, 12)
        (0.002, 0.6, 0.996)
    """
    if not isinstance(step, PerStep):
        raise TypeError(f"step must be a PerStep, got {type(step).__name__}")
    b0 = check_batch_size("from_batch_size", from_batch_size)
    b = check_batch_size("to_batch_size", to_batch_size)
    _rule(rule)
    _form(momentum_form)
    if b == b0:
        return replace(step)
    try:
        return to_per_step(to_conjugate(step, b0, rule, momentum_form), b, rule, momentum_form)
    except (ValueError, OverflowError) as e:  # a value float64 cannot hold (beta^k == 1)
        raise ValueError(
            f"rescaling {step} from batch size {b0} to {b} with rule {rule!r} gives values "
            f"float64 cannot represent ({e}); use a ratio closer to 1"
        ) from None


def per_example_gain(batch_size: int, noise_scale: float | None = None) -> float:
    r"""``rho = E[mean_b g_b^2] / E[g_hat^2]``: how much larger the per-example second moment
    is than the square of the batch-mean gradient at batch size ``B0``.

    Per coordinate ``E[g_hat^2] = G^2 + Sigma/B0`` and ``E[mean_b g_b^2] = G^2 + Sigma``
    (:mod:`sgdlab.stats.noise`); summed over coordinates, with the simple noise scale
    ``B_simple = tr Sigma / |G|^2``,

        rho = (1 + B_simple) / (1 + B_simple / B0)     in [1, B0],

    the gain ratio of AdaScale (Johnson et al. 2020) from batch size 1 to ``B0``. Where noise
    dominates (``B_simple >> B0``, the default ``noise_scale=None``) ``rho = B0``.
    """
    b0 = check_batch_size("batch_size", batch_size)
    if noise_scale is None:
        return float(b0)
    if isinstance(noise_scale, (int, float)) and noise_scale == math.inf:
        return float(b0)
    b = check_nonnegative("noise_scale", noise_scale)
    return (1.0 + b) / (1.0 + b / b0)


_TORCH_KEYS = {
    "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"),
    "rmsprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"),
}
_TORCH_DEFAULT_WD = {"adam": 0.0, "adamw": 1e-2, "rmsprop": 0.0}


def per_example_kwargs(
    optimizer: object,
    batch_size: int,
    *,
    noise_scale: float | None = None,
    **torch_kwargs: object,
) -> dict[str, object]:
    r"""Carry a ``torch.optim`` Adam, AdamW or RMSprop configuration tuned at batch size
    ``B0`` over to ``second_moment="per_example"`` at ``B0``.

    ``optimizer`` is a torch optimizer (its ``defaults`` are read) or one of the names
    ``"Adam"``, ``"AdamW"``, ``"RMSprop"`` with the torch keyword arguments given here.
    Returns keyword arguments for :class:`sgdlab.Adam` or :class:`sgdlab.RMSProp`.

    The batch-mean second moment ``g_hat^2`` that torch divides by is, in expectation,
    ``1/rho`` times the per-example one (:func:`per_example_gain`; ``rho = B0`` where noise
    dominates, which a tuned small batch usually is). Dividing by ``s^(1/2) + eps`` instead of
    ``(s/rho)^(1/2) + eps`` shrinks every step by ``rho^(1/2)``; the same steps are taken with

        lr' = rho^(1/2) lr,     eps' = rho^(1/2) eps,     betas unchanged (same B0).

    A centered RMSprop divides by the variance ``s - m^2`` (``Sigma/B0`` against ``Sigma``
    per example), whose ratio is ``B0`` at any noise scale. Where the gradient dominates
    (``B_simple << B0``) ``rho -> 1``: pass the measured ``noise_scale`` (``B_simple`` of
    :class:`sgdlab.stats.NoiseMeter`) to use the exact ratio.

    Example:
        >>> from sgdlab import hyper
        >>> kw = hyper.per_example_kwargs("Adam", 16, lr=1e-3, betas=(0.9, 0.999))
        >>> round(kw["lr"], 12), kw["betas"], kw["second_moment"], kw["ref_batch_size"]
        (0.004, (0.9, 0.999), 'per_example', 16)
    """
    if isinstance(optimizer, str):
        kind = optimizer.lower()
        given = dict(torch_kwargs)
    else:
        kind = type(optimizer).__name__.lower()
        if torch_kwargs:
            raise TypeError(
                "per_example_kwargs takes keyword arguments only with an optimizer name, "
                f"got a {type(optimizer).__name__} and {sorted(torch_kwargs)}"
            )
        given = dict(getattr(optimizer, "defaults", {}))
    if kind not in _TORCH_KEYS:
        raise ValueError(
            f"optimizer must be torch.optim Adam, AdamW or RMSprop (or their names), "
            f"got {optimizer!r}"
        )
    keys = _TORCH_KEYS[kind]
    unknown = sorted(k for k in torch_kwargs if k not in keys)
    if unknown:
        raise ValueError(f"per_example_kwargs: {unknown} are not {kind} options; allowed: {keys}")
    b0 = check_batch_size("batch_size", batch_size)
    out: dict[str, object] = {k: given[k] for k in keys if k in given}
    out.setdefault("lr", 1e-2 if kind == "rmsprop" else 1e-3)
    out.setdefault("eps", 1e-8)
    out.setdefault("weight_decay", _TORCH_DEFAULT_WD[kind])
    lr = check_positive("lr", out["lr"])
    eps = check_nonnegative("eps", out["eps"])
    rho = float(b0) if out.get("centered") else per_example_gain(b0, noise_scale)
    out["lr"] = lr * math.sqrt(rho)
    out["eps"] = eps * math.sqrt(rho)
    if "betas" in out:
        betas: tuple[float, float] = out["betas"]  # type: ignore[assignment]
        out["betas"] = (float(betas[0]), float(betas[1]))
    if kind == "adamw":
        # decoupled decay Phi *= 1 - lr wd: the same per step with lr' wd' = lr wd
        out["weight_decay"] = float(out["weight_decay"]) / math.sqrt(rho)  # type: ignore[arg-type]
        out["decoupled_weight_decay"] = True
    out.update(second_moment="per_example", ref_batch_size=b0)
    return out
