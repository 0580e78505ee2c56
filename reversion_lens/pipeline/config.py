"""The experiment config: seeds x arms x steps on one setting, read from TOML or built in Python.

The generic fields are the same for every setting; what differs (the checkpoints, the data, the model
size) lives in one table named after the setting, read by the setting itself::

    setting = "toy"                    # toy | unlearning | hf | package.module:Class
    seeds = [0, 1, 2, 3, 4]
    arms = ["none", "grad:v_rev", "grad:random", "control:rehearsal"]
    steps = 100

    [toy]                              # the setting's own table (ToyConfig fields and a preset)
    preset = "default"
    n_layers = 8

``reversion-lens run --example toy`` (or ``hf``) prints a complete, commented config.
"""

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ReversionLensError
from ..io import config_hash, default_cache_dir
from ..registry import ESTIMATORS, import_plugins
from ..sites import SITES
from .arms import Arm

__all__ = ["ExperimentConfig", "default_cache_dir", "LIST_FIELDS"]

#: Fields that are lists in TOML and tuples here.
LIST_FIELDS = ("seeds", "arms", "track_steps", "eval_steps", "plugins")
#: Fields that do not change any number (left out of the config's hash).
RUNTIME_FIELDS = ("workers", "threads_per_worker", "cache_dir")


@dataclass(frozen=True)
class ExperimentConfig:
    """Seeds x arms x steps on one setting. Every field is recorded in ``config.json``."""

    setting: str = "toy"  # a registered setting (toy, unlearning, hf) or "package.module:Class"
    params: dict[str, Any] = field(default_factory=dict)  # the setting's table ([toy], [hf], ...)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # a seed changes the history (toy), the data order, the random control
    arms: tuple[str, ...] = ("none", "grad:v_rev", "grad:random", "clamp:v_rev", "control:rehearsal")
    steps: int = 100  # fine-tuning steps T
    track_steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)  # drift measured after these updates
    eval_steps: tuple[int, ...] = (0, 20, 100)  # harmfulness and task cost evaluated here
    site: str = "resid_post"  # where v_rev is derived and the drift read
    direction: str = "mean_difference"  # the v_rev estimator (reversion_lens.registry.ESTIMATORS)
    report_layer: int | None = None  # layer named in the summary; None = the last layer
    null_draws: int = 20000  # Monte Carlo draws for the covariance-matched null
    penalty_weight: float = 1.0
    random_seed_offset: int = 10_000  # random control direction seed = seed + offset
    finetune_lr: float | None = None  # None = the setting's default
    checkpoint_every: int | None = None  # resumable state every K steps; None = "auto" (<= ~5% of the run)
    keep_state: bool = False  # keep each run's final resumable state (default: deleted when the run is done)
    save_model: str = "none"  # none | final | evaluated: write fine-tuned models into the run folder
    plugins: tuple[str, ...] = ()  # modules imported first in every process (your own modes, nulls, settings)
    workers: int = 2  # local processes; each uses threads_per_worker torch threads
    threads_per_worker: int = 1
    cache_dir: str | None = None  # history cache; None = $REVERSION_LENS_CACHE or ~/.cache/reversion_lens

    def __post_init__(self) -> None:
        try:
            self._validate()
        except ReversionLensError:
            raise
        except (TypeError, ValueError) as e:  # a value of the wrong kind, e.g. steps = "100" in a TOML file
            raise ConfigError(
                f"a config field has a value of the wrong kind ({e}); seeds, arms, track_steps and eval_steps are "
                "lists, steps an integer, the setting's table a table (see ExperimentConfig)."
            ) from e

    def _validate(self) -> None:
        for k in LIST_FIELDS:
            object.__setattr__(self, k, tuple(getattr(self, k)))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "track_steps", tuple(sorted({int(s) for s in self.track_steps})))
        object.__setattr__(self, "eval_steps", tuple(sorted({int(s) for s in self.eval_steps})))
        object.__setattr__(self, "params", dict(self.params))
        import_plugins(self.plugins)
        if self.site not in SITES:
            raise ConfigError(f"unknown site {self.site!r}; choose one of {', '.join(SITES)}.")
        ESTIMATORS[self.direction]  # an unknown estimator: ConfigError naming the registered ones
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}.")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one seed.")
        if len(set(self.seeds)) != len(self.seeds) or len(set(self.arms)) != len(self.arms):
            raise ConfigError("seeds and arms must each list every value once.")
        if not self.arms:
            raise ConfigError("arms is empty; give at least one arm, e.g. arms = ['none', 'grad:v_rev'].")
        bad = [s for s in (*self.track_steps, *self.eval_steps) if not 0 <= s <= self.steps]
        if bad:
            raise ConfigError(f"track/eval steps {bad} are outside 0..{self.steps}.")
        if self.save_model not in ("none", "final", "evaluated"):
            raise ConfigError(f"save_model must be 'none', 'final' or 'evaluated', not {self.save_model!r}.")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1 (or unset for 'auto'), got {self.checkpoint_every}.")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ConfigError("workers and threads_per_worker must be >= 1.")
        arms = [Arm.parse(a) for a in self.arms]
        from .setting import make_setting  # here, not at import: the setting may come from a plugin

        n_layers = make_setting(self).n_layers  # a bad setting table: an error now, not in a worker later
        if n_layers is None:
            return
        for arm in arms:
            wrong = [x for x in arm.layers or () if not -n_layers <= x < n_layers]
            if wrong:
                raise ConfigError(
                    f"arm {arm.name!r} blocks layer(s) {wrong}, but the model has {n_layers} layers (0..{n_layers - 1})."
                )
        if self.report_layer is not None and not 0 <= self.report_layer < n_layers:
            raise ConfigError(f"report_layer {self.report_layer} is outside the model's layers 0..{n_layers - 1}.")

    # ------------------------------------------------------------------ reading and writing
    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | os.PathLike | None = None) -> "ExperimentConfig":
        """From a TOML-shaped dict: generic fields plus one table named after the setting.

        ``base_dir``: where relative paths in the setting's table are resolved (the TOML file's folder).
        """
        d = dict(d)
        setting = d.get("setting", cls.setting)
        table = d.pop(setting, None) if isinstance(setting, str) else None
        if "params" in d:
            raise ConfigError(f"write the setting's fields in a [{setting}] table, not as 'params'.")
        names = {f.name for f in dataclasses.fields(cls)} - {"params"}
        unknown = sorted(set(d) - names)
        if unknown:
            tables = [k for k in unknown if isinstance(d[k], dict)]
            hint = (f" The table(s) {tables} belong to another setting; this config's setting is {setting!r}."
                    if tables else "")  # fmt: skip
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields are {sorted(names)}.{hint}")
        if table is not None and not isinstance(table, dict):
            raise ConfigError(f"[{setting}] must be a table of the setting's fields, got {table!r}.")
        for k in LIST_FIELDS:
            if k in d and (isinstance(d[k], (str, bytes)) or not isinstance(d[k], Iterable)):
                raise ConfigError(f"config field {k!r} must be a list, got {d[k]!r}; e.g. {k} = [0, 1].")
        params = dict(table or {})
        if base_dir is not None:
            from .setting import setting_class

            resolve = getattr(setting_class(setting, d.get("plugins", ())), "resolve_paths", None)
            if resolve is not None:  # relative paths in the table are relative to the TOML file
                params = resolve(params, Path(base_dir).resolve())
        return cls(**d, params=params)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "ExperimentConfig":
        import tomllib

        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"{path}: no such config file; `reversion-lens run --example toy > {path.name}` writes one."
            )
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(
                    f"{path} is not valid TOML ({e}); fix the syntax (strings in quotes, lists in [ ])."
                ) from e
        return cls.from_dict(data, base_dir=path.parent)

    def to_dict(self) -> dict[str, Any]:
        """TOML-shaped: generic fields, then the setting's table under its name."""
        d = dataclasses.asdict(self)
        d.pop("params")
        d[self.setting] = dict(self.params)
        return d

    def result_fields(self) -> dict[str, Any]:
        """The fields that change the numbers (not workers, threads or the cache location)."""
        d = self.to_dict()
        for k in RUNTIME_FIELDS:
            d.pop(k)
        return d

    def to_toml(self) -> str:
        lines, table = [], []
        for k, v in self.to_dict().items():
            if k == self.setting:
                table = [f"[{k}]"] + [_toml_line(ik, iv) for ik, iv in v.items()]
            else:
                lines.append(_toml_line(k, v))
        return "\n".join(lines + (["", *table] if table else [])) + "\n"

    def hash(self) -> str:
        return config_hash(self.result_fields())

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)


def _toml_line(k: str, v: Any) -> str:
    if v is None:
        return f"# {k} = (unset)"
    if isinstance(v, dict):
        inner = ", ".join(f"{ik} = {json.dumps(list(iv) if isinstance(iv, tuple) else iv)}" for ik, iv in v.items())
        return f"{k} = {{ {inner} }}"
    return f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}"
