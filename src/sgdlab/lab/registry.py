"""The experiment registry: one module per claim of the lecture, in the lecture's order.

An experiment module exposes ``NAME``, ``TITLE``, ``DESCRIPTION`` (a paragraph for the report),
``Config`` (a dataclass derived from :class:`~sgdlab.lab.config.ExperimentConfig`),
``PRESETS`` (overrides for ``tiny`` and ``full``; the defaults are ``quick``),
``run(config, outdir) -> dict`` (measurements, JSON-ready), ``claims(results) -> list[Claim]``
and ``plot(results, outdir) -> list[str]`` (figure file names, drawn from saved results only).

A *data-parallel* experiment also sets ``DATA_PARALLEL = True``, has a ``world_size`` config
field and a ``run_worker(config)`` function; only those accept ``sgdlab run NAME --nproc N``
with ``N > 1`` (:func:`data_parallel`). Under torchrun, rank 0 calls ``run`` (which then uses
the existing process group) and writes every file, the other ranks call ``run_worker`` (the same
collectives, no files). Without a process group ``run`` starts ``world_size`` ranks itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = [
    "COST_S",
    "EXPERIMENTS",
    "UnknownExperimentError",
    "cost",
    "data_parallel",
    "get",
    "names",
]

EXPERIMENTS: dict[str, str] = {
    "one_d": "e01_one_d",
    "convergence": "e02_convergence",
    "running_averages": "e03_running_averages",
    "momentum": "e04_momentum",
    "conjugacy": "e05_conjugacy",
    "batch_scaling": "e06_batch_scaling",
    "invariant_adam": "e07_invariant_adam",
    "rmsprop_power": "e08_rmsprop_power",
    "adam_bias": "e09_adam_bias",
    "gradient_flow": "e10_gradient_flow",
    "slope": "e11_slope",
    "langevin_1d": "e12_langevin_1d",
    "two_temperatures": "e13_two_temperatures",
    "mcmc": "e14_mcmc",
    "critical_batch": "e15_critical_batch",
    "data_parallel": "e16_data_parallel",
}


# Each experiment's recorded wall time in seconds (``meta.wall_time_s`` of its results.json) at
# the tiny and quick presets: `sgdlab reproduce` on one core of the 2-core development machine,
# SGDLAB_THREADS=1. The progress bar's estimate of the time left uses their ratios (a run
# rescales them by the rate it measures); the full preset, not timed, is taken as FULL_SCALE
# times quick. Update them from a fresh reproduce when an experiment's cost changes.
COST_S: dict[str, dict[str, float]] = {
    "one_d": {"quick": 0.27, "tiny": 0.04},
    "convergence": {"quick": 3.28, "tiny": 0.47},
    "running_averages": {"quick": 0.28, "tiny": 0.06},
    "momentum": {"quick": 1.91, "tiny": 3.56},
    "conjugacy": {"quick": 25.44, "tiny": 7.12},
    "batch_scaling": {"quick": 0.71, "tiny": 0.25},
    "invariant_adam": {"quick": 20.52, "tiny": 13.05},
    "rmsprop_power": {"quick": 4.09, "tiny": 1.18},
    "adam_bias": {"quick": 0.56, "tiny": 0.28},
    "gradient_flow": {"quick": 0.58, "tiny": 0.34},
    "slope": {"quick": 12.44, "tiny": 5.69},
    "langevin_1d": {"quick": 3.2, "tiny": 0.82},
    "two_temperatures": {"quick": 3.94, "tiny": 0.87},
    "mcmc": {"quick": 7.46, "tiny": 1.83},
    "critical_batch": {"quick": 5.07, "tiny": 0.72},
    "data_parallel": {"quick": 16.94, "tiny": 5.99},
}
FULL_SCALE = 10.0


def cost(name: str, preset: str) -> float:
    """The recorded wall time of ``name`` at ``preset`` in seconds (:data:`COST_S`)."""
    rec = COST_S.get(name, {})
    if preset in rec:
        return rec[preset]
    return FULL_SCALE * rec.get("quick", 1.0)


class UnknownExperimentError(KeyError):
    """Raised for an experiment name not in the registry; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


def names() -> list[str]:
    """Experiment names in report order."""
    return list(EXPERIMENTS)


def get(name: str) -> ModuleType:
    """Import and return the experiment module called ``name``."""
    if name not in EXPERIMENTS:
        raise UnknownExperimentError(
            f"unknown experiment {name!r}; valid experiments: {', '.join(EXPERIMENTS)}"
        )
    return importlib.import_module(f"sgdlab.lab.experiments.{EXPERIMENTS[name]}")


def data_parallel() -> list[str]:
    """Names of the experiments that accept ``--nproc N > 1`` (``DATA_PARALLEL = True``)."""
    return [n for n in EXPERIMENTS if getattr(get(n), "DATA_PARALLEL", False)]
