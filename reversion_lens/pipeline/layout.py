"""The results folder: where every file of an experiment lives and what its tables hold. One place.

Layout of a results folder (``out``), the same for every setting::

    config.json                       the experiment config, its hash, package versions, git commit
    runs/seed<k>/seed.json            per-seed facts: nulls per layer, evaluations of base and aligned (last)
    runs/seed<k>/history/<checkpoint>.safetensors   probe statistics of each checkpoint ([layer, d_model] means)
    runs/seed<k>/direction.safetensors                v_rev (key ``v_rev``, [layer, d_model])
    runs/seed<k>/vocab.csv                            v_rev read through the unembedding (when there is a tokenizer)
    runs/seed<k>/<arm>/steps/step_<n>.{json,safetensors}  what was measured at each logged step
    runs/seed<k>/<arm>/responses/step_<n>.jsonl       generated responses and verdicts (text settings)
    runs/seed<k>/<arm>/means.safetensors              probe means per tracked step (keys ``step_<n>``)
    runs/seed<k>/<arm>/trajectory.csv, evals.json, done.json   (done.json is written last)
    runs/seed<k>/<arm>/model[_step<n>]/               the fine-tuned model (with ``save_model``)
    trajectories.csv, summary.json, summary.md        the aggregate over runs (results.py)

Every file is written atomically; a file whose marker (``seed.json``, ``done.json``) exists is never
rewritten, anything without one is redone on rerun.
"""

import os
import sys
from pathlib import Path
from typing import Any

from ..drift import METRIC_COLUMNS
from ..errors import ResultsFormatError
from ..io import FORMAT_VERSION, FileLock, environment, read_json, write_json
from ..registry import NULLS
from .setting import METRICS

__all__ = [
    "seed_dir",
    "run_dir",
    "null_column",
    "null_columns",
    "trajectory_columns",
    "lock_for",
    "record_config",
]


def seed_dir(out: str | os.PathLike, seed: int) -> Path:
    return Path(out) / "runs" / f"seed{seed}"


def run_dir(out: str | os.PathLike, seed: int, arm: str) -> Path:
    return seed_dir(out, seed) / arm


def lock_for(folder: Path) -> FileLock:
    """The lock that keeps two processes from writing one seed or run folder."""
    return FileLock(folder / ".lock")


def null_column(name: str) -> str:
    return f"null_p99_{name}"


def null_columns() -> tuple[str, ...]:
    """One column per registered null model, in registry order."""
    return tuple(null_column(n) for n in NULLS.names())


def trajectory_columns() -> tuple[str, ...]:
    """The columns of ``trajectory.csv`` / ``trajectories.csv``: one row per (seed, arm, step, layer)."""
    return ("seed", "arm", "step", "layer", *METRIC_COLUMNS, *null_columns(), "weight_cos", *METRICS)


def record_config(out: Path, config: Any) -> None:
    """Record ``config`` in ``out/config.json``, or check it matches the one recorded there.

    Under a lock, so two processes started on one empty folder with different configs cannot both
    believe the folder is theirs.
    """
    path = out / "config.json"
    with FileLock(out / ".config.lock"):
        if path.exists():
            _check_recorded(out, read_json(path), config)
            return
        if (out / "runs").exists():  # config.json is written before any run: these are of unknown origin
            raise ResultsFormatError(
                f"{out} holds runs/ but no config.json, so nothing says which config or version wrote them; "
                "write to a new --out folder (or delete this one)."
            )
        record = {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "config_hash": config.hash(),
            "environment": environment(),
            "argv": sys.argv,
        }
        write_json(path, record)


def _check_recorded(out: Path, old: Any, config: Any) -> None:
    if not isinstance(old, dict):
        raise ResultsFormatError(
            f"{out / 'config.json'} is not a reversion_lens config record; write to a new --out folder (or delete "
            "this one)."
        )
    version = old.get("format_version")
    if version != FORMAT_VERSION:
        raise ResultsFormatError(
            f"{out} was written by results format {version}, this is format {FORMAT_VERSION}; "
            "write to a new --out folder (or delete this one)."
        )
    if old.get("config_hash") != config.hash():
        raise ResultsFormatError(
            f"{out} holds results of a different config (hash {old.get('config_hash')} vs {config.hash()}); "
            "use another --out folder, or delete it to start over."
        )
