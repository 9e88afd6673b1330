"""Shared plumbing for the dynamics package: dtypes, seeds, learning-rate schedules, inputs.

Conventions used throughout :mod:`sgdlab.dynamics`:

* chains are the leading dimension: a state is a tensor of shape ``(R, d)``;
* float64 is the default dtype (identities are checked to machine precision);
* a learning rate is either a float (constant) or any callable ``t -> eta_t`` evaluated at the
  step index ``t = 0, 1, 2, ...`` (``sgdlab.schedules`` objects are such callables).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._validation import check_nonnegative

DEFAULT_DTYPE = torch.float64

LearningRate = float | Callable[[int], float]

__all__ = ["DEFAULT_DTYPE", "LearningRate"]


def resolve_dtype(dtype: Any) -> torch.dtype:
    """Accept ``None`` (float64), a torch floating dtype, or the strings float32/float64."""
    if dtype is None:
        return DEFAULT_DTYPE
    if isinstance(dtype, str):
        table = {"float64": torch.float64, "float32": torch.float32, "double": torch.float64}
        if dtype not in table:
            raise ValueError(f"dtype must be one of 'float32', 'float64'; got {dtype!r}")
        return table[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype


def make_generator(seed: int | None, generator: torch.Generator | None = None) -> torch.Generator:
    """A CPU torch generator: the one given, else one seeded with ``seed`` (0 when None)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


BLOCK_ELEMENTS = 1 << 16  # noise blocks of about this many numbers stay in cache


class NormalBlocks:
    """Standard normal noise for ``steps`` steps of shape ``step_shape``, drawn in cache-sized
    blocks into a reused buffer and post-processed once per block by ``transform``.

    The numbers come from numpy's ziggurat sampler on the SFC64 bit generator (several times
    faster than ``torch.randn`` on CPU), seeded from the torch ``generator`` so that a torch
    seed still fixes the run. ``blocks(t)`` returns the noise of step t (t = 0, 1, ... in order).
    """

    def __init__(
        self,
        generator: torch.Generator,
        step_shape: tuple[int, ...],
        steps: int,
        dtype: torch.dtype,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        size = int(np.prod(step_shape))
        self.chunk = max(1, min(steps, BLOCK_ELEMENTS // max(1, size)))
        self.steps = steps
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self.rng = np.random.Generator(np.random.SFC64(seed))
        self.np_dtype = np.float32 if dtype == torch.float32 else np.float64
        self.dtype = dtype
        self.buffer = np.empty((self.chunk, *step_shape), dtype=self.np_dtype)
        self.transform = transform
        self.block: torch.Tensor | None = None

    def __call__(self, t: int) -> torch.Tensor:
        j = t % self.chunk
        if j == 0:
            view = self.buffer[: min(self.chunk, self.steps - t)]
            self.rng.standard_normal(out=view, dtype=self.np_dtype)
            block = torch.from_numpy(view)
            if block.dtype != self.dtype:
                block = block.to(self.dtype)
            self.block = self.transform(block) if self.transform is not None else block
        return self.block[j]


def scale_transform(
    K: torch.Tensor, shift: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``z -> z @ K + shift`` for blocks ``z`` of shape ``(n, R, d)`` (in place when K is
    diagonal; the per-coordinate factors are expanded to ``(R, d)`` once, because broadcasting
    a short trailing dimension is several times slower in torch's CPU kernels)."""
    off = K - torch.diag(K.diagonal())
    diag = K.diagonal().clone() if bool(torch.count_nonzero(off) == 0) else None
    if shift is not None and not bool(torch.count_nonzero(shift)):
        shift = None
    cache: dict[str, torch.Tensor] = {}

    def transform(z: torch.Tensor) -> torch.Tensor:
        if diag is not None:
            if "diag" not in cache:
                cache["diag"] = expand_full(diag, z.shape[1:])
            z = z.mul_(cache["diag"])
        else:
            z = z @ K
        if shift is not None:
            if "shift" not in cache:
                cache["shift"] = expand_full(shift, z.shape[1:])
            z += cache["shift"]
        return z

    return transform


def expand_full(v: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """``v`` (trailing dims) materialised to ``shape`` as a contiguous tensor."""
    return v.expand(*shape).contiguous()


def diagonal_or_none(a: torch.Tensor) -> torch.Tensor | None:
    """The diagonal of ``a`` if ``a`` is diagonal, else None."""
    off = a - torch.diag(a.diagonal())
    return a.diagonal().clone() if not bool(torch.count_nonzero(off)) else None


def as_matrix(
    name: str, value: Any, dim: int | None = None, *, symmetric: bool = False, psd: bool = False
) -> np.ndarray:
    """A finite float64 square matrix (a scalar or a vector of length d becomes a diagonal)."""
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1, 1) if dim is None else a * np.eye(dim)
    elif a.ndim == 1:
        a = np.diag(a)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {np.shape(value)}")
    if dim is not None and a.shape[0] != dim:
        raise ValueError(f"{name} must be {dim}x{dim}, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if symmetric or psd:
        if not np.allclose(a, a.T, rtol=1e-10, atol=1e-12):
            raise ValueError(f"{name} must be symmetric, got {a.tolist()}")
        a = 0.5 * (a + a.T)
    if psd:
        w = np.linalg.eigvalsh(a)
        if w.min() < -1e-10 * max(1.0, abs(w).max()):
            raise ValueError(f"{name} must be positive semi-definite, eigenvalues {w.tolist()}")
    return a


def as_vector(name: str, value: Any, dim: int | None = None) -> np.ndarray:
    """A finite float64 vector (a scalar is broadcast to length ``dim``)."""
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 0 and dim is not None:
        a = np.full(dim, float(a))
    if a.ndim != 1:
        raise ValueError(f"{name} must be a vector, got shape {np.shape(value)}")
    if dim is not None and a.shape[0] != dim:
        raise ValueError(f"{name} must have length {dim}, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return a


def psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (negative rounding clipped)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def resolve_lr(lr: LearningRate, name: str = "lr") -> Callable[[int], float]:
    """Turn a float or a schedule ``t -> eta_t`` into a validated callable.

    The callable raises if the schedule ever returns a negative or non-finite value.
    """
    if callable(lr):

        def schedule(t: int) -> float:
            value = lr(t)
            try:
                return check_nonnegative(f"{name}({t})", value)
            except ValueError:
                raise ValueError(
                    f"{name} schedule must return a finite learning rate >= 0; "
                    f"at step {t} it returned {value!r}"
                ) from None

        return schedule
    if isinstance(lr, bool):
        raise ValueError(f"{name} must be a float or a callable t -> eta_t, got {lr!r}")
    value = check_nonnegative(name, lr)
    return lambda t: value


def check_init(init: Any, chains: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """An initial state: a vector (same start for every chain) or an ``(R, d)`` array."""
    x = torch.as_tensor(np.asarray(init, dtype=np.float64) if not torch.is_tensor(init) else init)
    x = x.to(dtype=dtype)
    if x.ndim == 0 and dim == 1:
        x = x.reshape(1)
    if x.ndim == 1:
        if x.shape[0] != dim:
            raise ValueError(f"init must have length {dim} (the problem's dim), got {x.shape[0]}")
        x = x.expand(chains, dim)
    if x.ndim != 2 or x.shape != (chains, dim):
        raise ValueError(
            f"init must be a length-{dim} vector or a ({chains}, {dim}) array, "
            f"got shape {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("init must be finite")
    return x.clone()


def finite_or_raise(name: str, x: torch.Tensor, step: int) -> None:
    """Raise instead of carrying a NaN: the chains diverged (learning rate above stability)."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            f"{name} became non-finite at step {step}: the learning rate is probably above the "
            "stability limit (for a quadratic, eta * h_max < 2)"
        )
