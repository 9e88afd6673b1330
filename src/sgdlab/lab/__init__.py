"""The lab: one experiment per claim of the lecture, measured against its closed form.

``sgdlab reproduce`` runs every experiment (module ``sgdlab.lab.experiments.eNN_*``), saves
``DIR/<experiment>/results.json`` atomically, collects the claims in ``DIR/results.json`` and
writes the report ``DIR/index.html``. From Python::

    from sgdlab.lab import reproduce
    summary = reproduce("out", preset="tiny", names=["one_d"])
"""

from __future__ import annotations

from .claims import Claim, tolerance, verdict
from .config import ConfigError, ExperimentConfig, build_config
from .registry import EXPERIMENTS, UnknownExperimentError
from .report import build_report
from .runner import collect, is_finished, make_config, reproduce, run_experiment

__all__ = [
    "EXPERIMENTS",
    "Claim",
    "ConfigError",
    "ExperimentConfig",
    "UnknownExperimentError",
    "build_config",
    "build_report",
    "collect",
    "is_finished",
    "make_config",
    "reproduce",
    "run_experiment",
    "tolerance",
    "verdict",
]
