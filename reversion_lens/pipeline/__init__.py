"""The experiment pipeline: one runner for every setting.

==================  ==================================================================================
``config``          :class:`ExperimentConfig`: seeds x arms x steps, plus the setting's own table
``arms``            :class:`Arm`: the arm grammar (``none``, ``<mode>:<direction>[@layers]``, ``control:rehearsal``)
``setting``         the :class:`Setting` / :class:`SeedHistory` protocols and :data:`METRICS`
``layout``          the results folder: paths, the trajectory schema, ``config.json``
``runner``          :func:`run_experiment`: seed preparation, runs, resume, locks
``executors``       :class:`SerialExecutor`, :class:`LocalExecutor`, :class:`Progress`
``results``         aggregation: ``trajectories.csv``, ``summary.json``, ``summary.md``
==================  ==================================================================================

The pipeline imports no setting: settings plug in through :data:`reversion_lens.registry.SETTINGS`.
"""

from .arms import Arm
from .config import ExperimentConfig, default_cache_dir
from .executors import Executor, LocalExecutor, Progress, SerialExecutor
from .layout import run_dir, seed_dir, trajectory_columns
from .runner import run_experiment
from .setting import METRICS, SeedHistory, Setting, make_setting

__all__ = [
    "Arm",
    "ExperimentConfig",
    "default_cache_dir",
    "Executor",
    "SerialExecutor",
    "LocalExecutor",
    "Progress",
    "run_experiment",
    "run_dir",
    "seed_dir",
    "trajectory_columns",
    "METRICS",
    "Setting",
    "SeedHistory",
    "make_setting",
]
