"""reversion_lens: measure and block fine-tuning reversion along history-defined directions.

>>> import reversion_lens as rl
>>> hist = rl.toyworld.build_history(rl.toyworld.ToyConfig.preset("tiny"), seed=0)   # doctest: +SKIP
>>> probes = hist.probes("harmful")                                                   # doctest: +SKIP
>>> v = hist.history.direction(probes)            # v_rev, [layer, d_model]           # doctest: +SKIP
"""

import time as _time

_STARTED = _time.perf_counter()  # `reversion-lens demo` reports its wall time from here (imports included)

import importlib
from typing import Any

from . import errors, io, sites, stats
from .activations import ResidStats, residual_stats
from .directions import Direction, chain, mean_difference, principal_component, random_direction, vocab_readout
from .drift import drift_metrics
from .history import Checkpoint, History
from .probes import ProbeSet

__all__ = [
    "errors",
    "io",
    "sites",
    "stats",
    "ProbeSet",
    "ResidStats",
    "residual_stats",
    "Direction",
    "mean_difference",
    "principal_component",
    "chain",
    "random_direction",
    "vocab_readout",
    "drift_metrics",
    "Checkpoint",
    "History",
]
__version__ = "0.1.0"

# Heavier or optional parts load on first use: ``rl.figures``, ``rl.toyworld``, ...
_LAZY = {"figures", "export", "report", "toyworld", "pipeline", "training", "interventions", "tracking", "evaluation",
         "generation", "models", "specs", "text", "cli", "hooks", "nulls", "registry", "hf", "distributed", "data",
         "steering", "orthogonalize", "contrastive", "judges", "model_judges", "responses", "sources", "lora",
         "hf_export", "readout"}  # fmt: skip


# The verbs of DESIGN.md's sketch, also on first use: ``rl.block``, ``rl.finetune``, ``rl.DriftTracker``.
_LAZY_NAMES = {"block": "interventions", "finetune": "training", "DriftTracker": "tracking",
               "run_experiment": "pipeline", "ExperimentConfig": "pipeline", "steer": "steering",
               "ablate_everywhere": "steering", "orthogonalize": "orthogonalize",
               "contrastive_direction": "contrastive", "rank_layers": "contrastive", "greedy_generate": "generation",
               "evaluate_responses": "responses", "parse_judge": "model_judges", "save_hf": "hf_export",
               "apply_lora": "lora", "write_report": "report", "parse_spec": "specs"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'reversion_lens' has no attribute {name!r}")
