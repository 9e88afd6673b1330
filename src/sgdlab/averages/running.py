r"""A running average of tensors: :class:`RunningAverage`.

The recursion :math:`\hat\mu_t = (1-w_t)\hat\mu_{t-1} + w_t x_t` from :math:`\hat\mu_0 = 0`
with the weights of :mod:`sgdlab.averages.weights`.  Tensors of any shape are averaged
elementwise; a batch of independent sequences is one tensor whose leading dimension indexes the
sequences.

Example::

    >>> import torch
    >>> from sgdlab.averages import RunningAverage
    >>> avg = RunningAverage("lecture", horizon=10)
    >>> for x in [1.0, 2.0, 3.0]:
    ...     est = avg.update(torch.tensor(x, dtype=torch.float64))
    >>> est.item()  # the exact mean while t <= N
    2.0
"""

from __future__ import annotations

from typing import Any

import torch

from .._validation import check_choice, check_horizon
from .weights import KINDS, ema_mass, lecture_count

__all__ = ["RunningAverage"]


class RunningAverage:
    r"""Running average of a stream of tensors.

    Args:
        kind: ``"ema"`` (weight :math:`1/N`, biased to 0 early), ``"lecture"``
            (:math:`1/\min(N,t)`), ``"adam"`` (EMA divided by :math:`1-\beta^t`,
            :math:`\beta = 1-1/N`) or ``"mean"`` (:math:`1/t`, no horizon).
        horizon: the horizon :math:`N \ge 1` in steps; required unless ``kind="mean"``.

    ``update(x, horizon=N_t)`` changes the horizon from that step on (e.g. after the batch
    size changed, so the same horizon in examples spans a different number of steps); the
    weights then follow the rules in :mod:`sgdlab.averages.weights`: the ``"adam"`` estimate
    divides by the data mass actually accumulated and stays unbiased, the ``"lecture"``
    estimate's effective count grows by one per step and is capped by the current horizon.

    Attributes ``t`` (updates so far), ``count`` (effective count of the lecture average),
    ``mass`` (the EMA's data mass :math:`1 - \prod_s(1-1/N_s)`; :math:`E\hat\mu_t = \mu\cdot`
    ``mass`` for the ``"ema"`` kind) are plain floats.
    """

    def __init__(self, kind: str = "lecture", horizon: float | None = None) -> None:
        self.kind: str = check_choice("kind", kind, KINDS)
        if kind == "mean":
            self.horizon: float | None = (
                None if horizon is None else check_horizon("horizon", horizon)
            )
        else:
            if horizon is None:
                raise ValueError(
                    f"horizon must be a horizon >= 1 for kind={kind!r}, got None "
                    "(only kind='mean' needs no horizon)"
                )
            self.horizon = check_horizon("horizon", horizon)
        self.reset()

    def reset(self) -> None:
        """Forget every sample: back to :math:`\\hat\\mu_0 = 0`, ``t = 0``."""
        self.t: int = 0
        self.count: float = 0.0
        self.mass: float = 0.0
        self._value: torch.Tensor | None = None

    @property
    def value(self) -> torch.Tensor:
        """The current estimate :math:`\\hat\\mu_t` (raises before the first update)."""
        if self._value is None:
            raise ValueError("value is undefined before the first update (t = 0)")
        return self._value

    def next_weight(self, horizon: float | None = None) -> float:
        """The weight the next update would give its sample (no state change)."""
        N = self._horizon(horizon)
        if self.kind == "mean":
            return 1.0 / (self.t + 1)
        if self.kind == "ema":
            return 1.0 / N
        if self.kind == "lecture":
            return 1.0 / lecture_count(self.count, N)
        return (1.0 / N) / ema_mass(self.mass, N)

    def _horizon(self, horizon: float | None) -> float:
        if horizon is not None:
            return check_horizon("horizon", horizon)
        if self.horizon is None:
            return 1.0  # only reached for kind="mean", where N plays no part
        return self.horizon

    def update(self, x: Any, horizon: float | None = None) -> torch.Tensor:
        r"""Add sample ``x`` (tensor or number) and return the new estimate :math:`\hat\mu_t`.

        ``horizon``, if given, becomes the horizon for this and later updates.  The returned
        tensor is new (``x`` and earlier estimates are not modified).  Integer or boolean
        samples are averaged in torch's default floating dtype.
        """
        x = torch.as_tensor(x)
        if not (x.is_floating_point() or x.is_complex()):
            x = x.to(torch.get_default_dtype())
        N = self._horizon(horizon)
        if self._value is None:
            previous = torch.zeros_like(x)
        else:
            previous = self._value
            if previous.shape != x.shape:
                raise ValueError(
                    f"x must have the shape of earlier samples {tuple(previous.shape)}, "
                    f"got {tuple(x.shape)}"
                )
            x = x.to(previous.dtype)
        w = self.next_weight(N)
        self.t += 1
        self.count = lecture_count(self.count, N)
        self.mass = ema_mass(self.mass, N)
        if horizon is not None:
            self.horizon = N
        self._value = torch.lerp(previous, x, w)
        return self._value

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: kind, horizon, t, count, mass, value."""
        return {
            "kind": self.kind,
            "horizon": self.horizon,
            "t": self.t,
            "count": self.count,
            "mass": self.mass,
            "value": None if self._value is None else self._value.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self.kind = check_choice("kind", state["kind"], KINDS)
        self.horizon = state["horizon"]
        self.t = int(state["t"])
        self.count = float(state["count"])
        self.mass = float(state["mass"])
        value = state["value"]
        self._value = None if value is None else value.clone()

    def __repr__(self) -> str:
        return f"RunningAverage(kind={self.kind!r}, horizon={self.horizon!r}, t={self.t})"
