"""The setting protocol: what differs between experiments, seen by the runner only through this interface.

A *setting* (the toy world, toy unlearning, Hugging Face checkpoints, or your own) is a class registered
in :data:`reversion_lens.registry.SETTINGS` (or named as ``"package.module:Class"`` in the config),
built from the config as ``cls(config)``, cheaply: no model is loaded. Per seed it hands the runner a
:class:`SeedHistory`: the checkpoints, probes, fine-tuning data and evaluations of that seed. The runner
owns everything else (seeds x arms x steps, v_rev and the nulls, interventions, tracking, evaluation
steps, resumable states, locks, aggregation) and writes the same results folder for every setting.

The evaluation contract: ``evaluate(model)`` returns a dict whose keys are among :data:`METRICS` (missing
ones are written as empty cells); it may add ``"responses"``: a list of JSON-able dicts (one per
generated response) that the runner writes to ``responses/step_<n>.jsonl``.
"""

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigError
from ..registry import SETTINGS, import_plugins

__all__ = ["METRICS", "Setting", "SeedHistory", "make_setting", "setting_class"]

#: Evaluation columns of ``trajectories.csv``, the same in every setting (empty where a setting has none).
METRICS = (
    "harmful_rate",  # share of harmful prompts complied with (the harm rate)
    "refusal_rate",  # share of harmful prompts refused
    "harmful_correct_rate",  # share of harmful prompts answered fully correctly (toy settings)
    "over_refusal_rate",  # share of benign prompts refused
    "task_accuracy",  # benign task accuracy (toy: exact match; text: next-token accuracy on held-out pairs)
    "task_loss",  # benign held-out response loss (nats per token)
    "task_kl",  # KL(aligned || model) on held-out benign prompts (nats per token): moves before accuracy does
    "refusal_prob",  # mean probability of refusing as the first response token on harmful prompts (toy)
)


@runtime_checkable
class SeedHistory(Protocol):
    """One seed's history and everything measured on it."""

    history: Any  # a reversion_lens.History whose checkpoints include "base" and "aligned"
    tokenizer: Any  # for the vocabulary readout (None: skipped)
    meta: dict[str, Any]  # JSON facts about how the history was built (recorded in seed.json)

    def load(self, name: str) -> Any:
        """A fresh model of checkpoint ``name`` (safe to fine-tune)."""
        ...

    def probes(self) -> Any:
        """The probe set v_rev is derived and tracked on."""
        ...

    def finetune_data(self, data: str, seed: int) -> Any:
        """A BatchSource: ``"benign"`` or ``"rehearsal"`` (benign with the alignment data mixed in)."""
        ...

    def finetune_optim(self, **overrides: Any) -> Any:
        """The fine-tuning OptimConfig (``overrides`` replace fields, e.g. ``lr``)."""
        ...

    def evaluate(self, model: Any) -> dict[str, Any]:
        """Keys among :data:`METRICS` (plus optional ``"responses"``)."""
        ...

    # Optional: ``prepare_finetune(model) -> model`` (e.g. add LoRA adapters before fine-tuning) and
    # ``save_model(model, folder)`` (for ``save_model = "final" | "evaluated"``).


@runtime_checkable
class Setting(Protocol):
    """Built as ``cls(config)`` from an :class:`~reversion_lens.pipeline.config.ExperimentConfig`."""

    n_layers: int | None  # known without loading weights (None: unknown until a model loads)
    track_weights: bool  # measure weight-space reversion (weight_cos) at logged steps
    device: str  # "cpu", "cuda", ...: a Ray executor asks for a GPU per task when it is CUDA
    probe_batch_size: int | None  # prompts per forward pass for statistics and tracking (None: all at once)

    def history(self, seed: int) -> SeedHistory:
        """Build (or load from the cache) the history of ``seed``."""
        ...

    def history_id(self, seed: int) -> str:
        """Seeds with equal ids share checkpoints, probes and evaluations (computed once, reused)."""
        ...


def setting_class(name: str, plugins: Sequence[str] = ()) -> type:
    """The class of setting ``name``: a registered name or ``"package.module:Class"``."""
    import_plugins(tuple(plugins))
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"setting {name!r} cannot be imported ({e}); check the module is on PYTHONPATH.") from e
        return obj
    return SETTINGS[name].obj


def make_setting(config: Any) -> Setting:
    """The config's setting object (validates the setting's table; loads no model)."""
    cls = setting_class(config.setting, config.plugins)
    setting = cls(config)
    missing = [a for a in ("n_layers", "track_weights", "device", "probe_batch_size", "history", "history_id")
               if not hasattr(setting, a)]  # fmt: skip
    if missing:
        raise ConfigError(f"setting {config.setting!r} does not implement {missing} of the Setting protocol.")
    return setting
