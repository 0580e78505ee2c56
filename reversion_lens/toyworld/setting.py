"""The toy world and toy unlearning as settings of the experiment runner (:mod:`reversion_lens.pipeline`).

``[toy]`` table: ``preset`` (``default`` | ``paper`` | ``tiny``) plus any :class:`ToyConfig` field::

    setting = "toy"
    [toy]
    preset = "default"
    n_layers = 8

``[unlearning]`` table: the same, plus ``forget`` (the operation to unlearn; default ``rev``). Its
history is the toy pretraining followed by an unlearning phase that refuses ``forget`` only; the harm
columns then measure the forgotten operation's return (``harmful_rate``: no longer refused;
``harmful_correct_rate``: answered fully correctly), ``task_accuracy`` the retained operations.

A seed seeds everything (initial weights, every phase's data, the fine-tuning order); histories are
cached under ``<cache_dir>/toyworld`` by config and seed.
"""

from pathlib import Path
from typing import Any

from ..errors import ConfigError, reject_unknown_fields
from .history import ToyConfig, ToyHistory, build_history
from .unlearning import UnlearningHistory, build_unlearning_history

__all__ = ["ToySetting", "UnlearningSetting", "toy_config"]


def toy_config(params: dict[str, Any], extra: tuple[str, ...] = ()) -> ToyConfig:
    """The :class:`ToyConfig` of a ``[toy]`` table (``preset`` + field overrides)."""
    fields = {k: v for k, v in params.items() if k != "preset" and k not in extra}
    reject_unknown_fields(ToyConfig, fields, "[toy]")
    tuples = {k: tuple(v) for k, v in fields.items() if isinstance(v, list)}
    return ToyConfig.preset(params.get("preset", "default"), **{**fields, **tuples})


class ToySetting:
    """The embedded toy world: a tiny transformer pretrained, aligned and fine-tuned on a chat language."""

    track_weights = True
    device = "cpu"
    probe_batch_size = 32

    def __init__(self, config: Any):
        self.config = config
        self.toy = toy_config(config.params)
        self.n_layers: int | None = self.toy.n_layers
        self.cache = Path(config.resolved_cache_dir()) / "toyworld"

    def history(self, seed: int) -> ToyHistory:
        return build_history(self.toy, seed, cache_dir=self.cache)

    def history_id(self, seed: int) -> str:
        return self.toy.key(seed)


class UnlearningSetting(ToySetting):
    """Toy unlearning: one operation (``forget``) refused after pretraining; does fine-tuning bring it back?"""

    def __init__(self, config: Any):
        self.forget = config.params.get("forget", "rev")
        if not isinstance(self.forget, str):
            raise ConfigError(f"[unlearning] forget must be an operation name such as 'rev', got {self.forget!r}.")
        self.config = config
        self.toy = toy_config(config.params, extra=("forget",))
        self.n_layers = self.toy.n_layers
        self.cache = Path(config.resolved_cache_dir()) / "toyworld"
        if self.forget not in self.toy.ops:
            raise ConfigError(f"[unlearning] forget {self.forget!r} is not one of the operations {self.toy.ops}.")

    def history(self, seed: int) -> UnlearningHistory:
        return build_unlearning_history(self.toy, seed, self.forget, cache_dir=self.cache)

    def history_id(self, seed: int) -> str:
        return f"unlearn-{self.forget}-" + self.toy.key(seed)
