"""Experiments: a config dataclass, arms, and a resumable runner that writes one folder per run.

Layout of a results folder (``out``)::

    config.json                       the experiment config, its hash, package versions, git commit
    runs/seed<k>/seed.json            per-seed facts: nulls per layer, evaluations of base and aligned
    runs/seed<k>/history/{base,aligned}.safetensors   probe means (key ``mean``, [layer, d_model])
    runs/seed<k>/direction.safetensors                v_rev (key ``v_rev``, [layer, d_model])
    runs/seed<k>/<arm>/steps/step_<n>.{json,safetensors}  what was measured at each logged step
    runs/seed<k>/<arm>/means.safetensors              probe means per logged step (keys ``step_<n>``)
    runs/seed<k>/<arm>/trajectory.csv, evals.json, done.json   (done.json is written last)
    trajectories.csv, summary.json, summary.md        the aggregate over runs (results.py)

Every file is written atomically. A rerun skips seeds and runs that are complete and resumes an
interrupted fine-tuning run from its last saved state (``state/``), so its numbers are identical to an
uninterrupted run's. A per-run lock keeps two processes pointed at one folder from writing one run.

Arms are strings: ``none``; ``<mode>:<direction>`` with mode in ``grad, clamp, ablate, update,
penalty-block, penalty-push`` and direction ``v_rev`` or ``random``; ``control:<data>`` fine-tunes on
other data (``aligned-mix``: the alignment refusals kept in, the negative control). A ``@<layers>``
suffix blocks a subset of layers, e.g. ``grad:v_rev@1`` or ``grad:v_rev@0,2``.
"""

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .errors import ConfigError, ResultsFormatError, ReversionLensError, reject_unknown_fields
from .io import FORMAT_VERSION, FileLock, config_hash, environment, read_json, write_json
from .sites import SITES

__all__ = [
    "Arm",
    "ExperimentConfig",
    "Executor",
    "SerialExecutor",
    "LocalExecutor",
    "run_experiment",
    "seed_dir",
    "run_dir",
]

MODES = ("grad", "clamp", "ablate", "update", "penalty-block", "penalty-push")
DIRECTIONS = ("v_rev", "random")


@dataclass(frozen=True)
class Arm:
    """One experimental condition, parsed from its name (see the module docstring)."""

    name: str
    mode: str | None = None
    direction: str | None = None
    data: str = "benign"
    layers: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, name: str) -> "Arm":
        base, _, layer_part = name.partition("@")
        layers = None
        if layer_part:
            try:
                layers = tuple(int(x) for x in layer_part.split(","))
            except ValueError:
                raise ConfigError(f"arm {name!r}: layers after '@' must be integers, e.g. 'grad:v_rev@0,2'.") from None
        if base == "none":
            return cls(name, layers=layers)
        head, _, tail = base.partition(":")
        if head == "control":
            if tail not in ("aligned-mix", "benign"):
                raise ConfigError(f"arm {name!r}: control data must be 'aligned-mix' (or 'benign').")
            return cls(name, data=tail, layers=layers)
        if head not in MODES or tail not in DIRECTIONS:
            raise ConfigError(
                f"unknown arm {name!r}; use 'none', 'control:aligned-mix' or '<mode>:<direction>' with mode in "
                f"{MODES} and direction in {DIRECTIONS}, optionally '@<layers>'."
            )
        return cls(name, mode=head, direction=tail, layers=layers)


@dataclass(frozen=True)
class ExperimentConfig:
    """Seeds x arms x steps on one setting. Every field is recorded in ``config.json``."""

    setting: str = "toy"  # the only built-in setting: the toy world
    preset: str = "default"  # toy presets: default | paper | tiny
    toy: dict[str, Any] = field(default_factory=dict)  # ToyConfig field overrides
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    arms: tuple[str, ...] = ("none", "grad:v_rev", "grad:random", "clamp:v_rev", "control:aligned-mix")
    steps: int = 100  # fine-tuning steps T
    track_steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)  # drift measured after these updates
    eval_steps: tuple[int, ...] = (0, 20, 100)  # harmfulness and task cost evaluated here
    site: str = "resid_post"
    report_layer: int | None = None  # layer named in the summary; None = the last layer
    n_probes: int | None = None  # None = the setting's default (256 for the toy world)
    null_draws: int = 20000  # Monte Carlo draws for the covariance-matched null
    penalty_weight: float = 1.0
    random_seed_offset: int = 10_000  # random control direction seed = seed + offset
    finetune_lr: float | None = None  # None = the setting's default
    workers: int = 2  # local processes; each uses threads_per_worker torch threads
    threads_per_worker: int = 1
    cache_dir: str | None = None  # toy history cache; None = $REVERSION_LENS_CACHE or ~/.cache/reversion_lens

    def __post_init__(self) -> None:
        try:
            self._validate()
        except ReversionLensError:
            raise
        except (TypeError, ValueError) as e:  # a value of the wrong kind, e.g. steps = "100" in a TOML file
            raise ConfigError(
                f"a config field has a value of the wrong kind ({e}); seeds, arms, track_steps and eval_steps are "
                "lists, steps an integer, toy a table of ToyConfig fields (see ExperimentConfig)."
            ) from e

    def _validate(self) -> None:
        if self.setting != "toy":
            raise ConfigError(f"unknown setting {self.setting!r}; the only built-in setting is 'toy'.")
        if self.site not in SITES:
            raise ConfigError(f"unknown site {self.site!r}; choose one of {', '.join(SITES)}.")
        for a in self.arms:
            Arm.parse(a)
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}.")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one seed.")
        bad = [s for s in (*self.track_steps, *self.eval_steps) if not 0 <= s <= self.steps]
        if bad:
            raise ConfigError(f"track/eval steps {bad} are outside 0..{self.steps}.")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "track_steps", tuple(sorted(set(self.track_steps))))
        object.__setattr__(self, "eval_steps", tuple(sorted(set(self.eval_steps))))
        object.__setattr__(self, "toy", dict(self.toy))
        from .toyworld.history import ToyConfig
        from .toyworld.runner import toy_config

        reject_unknown_fields(ToyConfig, self.toy, "toy")
        n_layers = toy_config(self).n_layers  # a bad preset or toy value: an error now, not in a worker later
        for a in self.arms:
            bad = [x for x in Arm.parse(a).layers or () if not -n_layers <= x < n_layers]
            if bad:
                raise ConfigError(
                    f"arm {a!r} blocks layer(s) {bad}, but the model has {n_layers} layers (0..{n_layers - 1})."
                )
        if self.report_layer is not None and not 0 <= self.report_layer < n_layers:
            raise ConfigError(f"report_layer {self.report_layer} is outside the model's layers 0..{n_layers - 1}.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
        reject_unknown_fields(cls, d, "config")
        d = dict(d)
        for k in ("seeds", "arms", "track_steps", "eval_steps"):
            if k in d:
                if isinstance(d[k], (str, bytes)) or not isinstance(d[k], Iterable):
                    raise ConfigError(f"config field {k!r} must be a list, got {d[k]!r}; e.g. {k} = [0, 1].")
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "ExperimentConfig":
        import tomllib

        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(
                    f"{path} is not valid TOML ({e}); fix the syntax (strings in quotes, lists in [ ])."
                ) from e
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_fields(self) -> dict[str, Any]:
        """The fields that change the numbers (not workers, threads or cache location)."""
        d = self.to_dict()
        for k in ("workers", "threads_per_worker", "cache_dir"):
            d.pop(k)
        return d

    def to_toml(self) -> str:
        lines = []
        for k, v in self.to_dict().items():
            if v is None:
                lines.append(f"# {k} = (unset)")
            elif isinstance(v, dict):
                inner = ", ".join(f"{ik} = {json.dumps(iv)}" for ik, iv in v.items())
                lines.append(f"{k} = {{ {inner} }}")
            else:
                lines.append(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}")
        return "\n".join(lines) + "\n"

    def hash(self) -> str:
        return config_hash(self.result_fields())

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        env = os.environ.get("REVERSION_LENS_CACHE")
        return Path(env) if env else Path.home() / ".cache" / "reversion_lens"


# ---------------------------------------------------------------- executors
class Executor(Protocol):
    """Runs independent tasks: ``map(fn, items)`` returns the results in order."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]: ...


class SerialExecutor:
    """In this process, one task at a time (notebooks, tests, debugging)."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return [fn(x) for x in items]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class LocalExecutor:
    """A pool of local processes (``spawn``), ``threads`` torch threads each.

    On a small machine one thread per process is several times faster than several threads per
    process (TOYWORLD.md): parallelise seeds and arms across processes instead.
    """

    def __init__(self, workers: int = 2, threads: int = 1):
        self.workers, self.threads = max(1, workers), threads

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if self.workers == 1 or len(items) <= 1:
            _init_worker(self.threads)
            return [fn(x) for x in items]
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.threads,)) as pool:
            return list(pool.map(fn, items))


# ---------------------------------------------------------------- layout
def seed_dir(out: str | os.PathLike, seed: int) -> Path:
    return Path(out) / "runs" / f"seed{seed}"


def run_dir(out: str | os.PathLike, seed: int, arm: str) -> Path:
    return seed_dir(out, seed) / arm


def _check_or_write_config(out: Path, config: ExperimentConfig) -> None:
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
        write_json(
            path,
            {
                "format_version": FORMAT_VERSION,
                "config": config.to_dict(),
                "config_hash": config.hash(),
                "environment": environment(),
                "argv": sys.argv,
            },
        )


def _check_recorded(out: Path, old: Any, config: ExperimentConfig) -> None:
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


def run_experiment(
    config: ExperimentConfig,
    out: str | os.PathLike,
    executor: Executor | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Path:
    """Run (or resume) every seed x arm of ``config`` into ``out`` and aggregate. Returns ``out``."""
    from . import results
    from .toyworld.runner import run_task

    out = Path(out).resolve()  # workers (other processes, other machines) must not depend on our cwd
    out.mkdir(parents=True, exist_ok=True)
    if config.cache_dir is not None:
        config = dataclasses.replace(config, cache_dir=str(Path(config.cache_dir).resolve()))
    else:
        config = dataclasses.replace(config, cache_dir=str(config.resolved_cache_dir().resolve()))
    _check_or_write_config(out, config)
    executor = executor or LocalExecutor(config.workers, config.threads_per_worker)
    say = log or (lambda s: None)
    # Every seed's preparation (history, v_rev, nulls: the long tasks) is queued first, then the runs seed by
    # seed. Workers take tasks in order, so a run starts only once its seed is ready or being prepared by
    # another worker, and the last seed to be prepared has its runs last: no worker waits on a seed's lock
    # while other work is queued. (Both kinds of task are idempotent and locked, so any order is correct.)
    runs = [(config, s, a, str(out)) for s in config.seeds for a in config.arms]
    todo = [t for t in runs if not (run_dir(out, t[1], t[2]) / "done.json").exists()]
    seeds = [(config, s, str(out)) for s in dict.fromkeys(t[1] for t in todo)]
    seeds = [t for t in seeds if not (seed_dir(out, t[1]) / "seed.json").exists()]
    say(f"[1/2] {len(config.seeds)} seeds x {len(config.arms)} arms -> {out}: {len(todo)} of {len(runs)} runs to do "
        f"({len(runs) - len(todo)} already complete)")  # fmt: skip
    executor.map(run_task, [("seed", t) for t in seeds] + [("run", t) for t in todo])
    say("[2/2] aggregating")
    results.aggregate(out, config)
    return out


def lock_for(path: Path) -> FileLock:
    return FileLock(path / ".lock")


def write_rows_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    import io as _io

    from .io import atomic_write_text

    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def _fmt(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, float):
        if x != x:  # NaN
            return ""
        return repr(x)
    return x
