"""The second reversion setting: an unlearned operation, and whether fine-tuning brings it back.

History: pretraining on all operations (the same cached model as the main history's ``base``), then
an *unlearning* phase in which one operation, ``forget_op``, is answered ``REFUSE EOS`` while the
others are still answered; mechanically, alignment with ``harmful_ops=(forget_op,)``. Fine-tuning
then uses the *other* operations only (all nine, including the main setting's harmful ones).

Re-emergence is measured on held-out prompts of the forgotten operation: ``forget_rate`` (share no
longer refused) and ``forget_accuracy`` (share answered fully correctly: the capability itself).
Whether its drift aligns with the history direction is measured as in the main setting, with
``probes("forget")`` and the checkpoints ``base`` and ``aligned`` (here: the unlearned model).

Measured with ``python analyses/unlearning.py`` (default preset, forget ``rev``, seeds 0-4, 100 steps):
unlearning holds (forget_rate 0% in every seed, retained accuracy 99.1%). Benign fine-tuning on the
other operations moves the forget probes along v_rev as in the main setting (cos 0.72 ± 0.06 at the
last layer, against 0.19 ± 0.14 for the aligned-mix control), but at the main setting's lr of 1e-4 the
forgotten operation comes back in one seed of five (forget_rate 0, 0, 31, 0, 1%). At lr 3e-4 it comes
back in most (9, 1, 93, 9, 58%; 20.8 ± 28.2% answered fully correctly) while the control stays at 0%.
"""

import dataclasses
import os
from typing import Any

from ..errors import ConfigError
from ..probes import ProbeSet
from .history import ToyConfig, ToyHistory, build_history
from .language import OPS, Example, evaluate

__all__ = ["UnlearningHistory", "build_unlearning_history", "unlearning_config"]

_KINDS = {"forget": "harmful", "retain": "benign", "harmful": "harmful", "benign": "benign"}


def unlearning_config(config: ToyConfig, forget_op: str) -> ToyConfig:
    """``config`` with one operation to unlearn (refused) and all others retained."""
    if forget_op not in config.ops:
        raise ConfigError(f"forget_op {forget_op!r} is not one of the operations {config.ops}.")
    return dataclasses.replace(config, harmful_ops=(forget_op,))


class UnlearningHistory(ToyHistory):
    """A :class:`ToyHistory` whose ``aligned`` checkpoint has unlearned (refuses) ``forget_op``.

    ``probes("forget")`` / ``probes("retain")`` and ``finetune_data("benign")`` (the retained
    operations) work as in the main setting; :meth:`measure` reports re-emergence.
    """

    @property
    def forget_op(self) -> str:
        return self.language.harmful_ops[0]

    @property
    def retain_ops(self) -> tuple[str, ...]:
        return self.language.benign_ops

    def _held_out(self, region: str, kind: str, n: int) -> list[Example]:
        if kind not in _KINDS:
            raise ConfigError(f"unknown kind {kind!r}; use 'forget' or 'retain'.")
        return super()._held_out(region, _KINDS[kind], n)

    def probes(self, kind: str = "forget", n: int | None = None) -> ProbeSet:
        """Held-out prompts of the forgotten (``"forget"``) or retained (``"retain"``) operations."""
        return super().probes(kind, n)

    def measure(self, model: Any, batch_size: int = 128) -> dict[str, float]:
        """``forget_rate`` (forgotten op not refused), ``forget_accuracy`` (answered correctly),
        ``forget_refusal_prob`` (mean P(REFUSE) as the first response token), ``retain_accuracy``,
        ``retain_refusal_rate`` and ``retain_loss`` on held-out prompts."""
        sets = self.eval_sets()
        r = evaluate(model, sets["harmful"], sets["benign"], batch_size=batch_size)
        return {
            "forget_rate": r["harmful_rate"],
            "forget_accuracy": r["harmful_correct_rate"],
            "retain_accuracy": r["task_accuracy"],
            "retain_refusal_rate": r["benign_refusal_rate"],
            "retain_loss": r["task_loss"],
            "forget_refusal_prob": r["refusal_prob"],
        }


def build_unlearning_history(
    config: ToyConfig,
    seed: int,
    forget_op: str = "rev",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    num_threads: int | None = 1,
) -> UnlearningHistory:
    """Pretrain on all operations (cached, shared with :func:`build_history`), then unlearn ``forget_op``.

    ``config.harmful_ops`` is replaced by ``(forget_op,)``; alignment settings (steps, lr, batch,
    ``refuse_fraction``) are used for the unlearning phase. Cached like :func:`build_history`.
    """
    if forget_op not in OPS:
        raise ConfigError(f"unknown forget_op {forget_op!r}; choose from {', '.join(OPS)}.")
    hist = build_history(unlearning_config(config, forget_op), seed, cache_dir, progress, num_threads)
    out = UnlearningHistory(hist.config, hist.seed, hist.folder)
    out._owner = hist  # keeps a temporary cache folder alive as long as this object
    return out
