"""Evaluations: refusal, harmful compliance and over-refusal (judged greedy responses), task cost.

Refusal and harm: :func:`evaluate_responses` (in :mod:`reversion_lens.responses`, re-exported here with
:func:`harmfulness`, :func:`save_responses` and the judge names) gives ``refusal_rate``, ``harmful_rate``
and ``over_refusal_rate``. Task cost: :func:`heldout_loss` (token-weighted mean cross-entropy and
next-token argmax accuracy over the target tokens of held-out batches) and :func:`kl_to_reference`: the
mean over real tokens of ``KL(reference || model)``, the reference's next-token distribution against
the model's. That direction weighs each token by the reference's own probability, so it measures how
much of what the reference (aligned) model would say the fine-tuned model has lost; it is finite
wherever the model's softmax is, and is the direction refusal-direction work reports for ablation side
effects. :class:`Evaluator` runs them as a fine-tuning callback.

All evaluations run in eval mode (no dropout) and restore every module's mode; they do not pause
interventions (an ``ablate`` hook attached on purpose is evaluated).
"""

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import Batch, next_token_scores
from .errors import ConfigError, ProbeError, ShapeError
from .hooks import eval_mode
from .judges import REFUSAL_PREFIXES, as_judge, is_refusal, refusal_judge
from .probes import ProbeSet
from .responses import (
    HarmfulnessResult,
    JudgedResponses,
    ResponseRecord,
    evaluate_responses,
    harmfulness,
    save_responses,
)

__all__ = [
    "REFUSAL_PREFIXES",
    "Evaluator",
    "HarmfulnessResult",
    "JudgedResponses",
    "ResponseRecord",
    "evaluate_responses",
    "harmfulness",
    "heldout_loss",
    "is_refusal",
    "kl_to_reference",
    "refusal_judge",
    "save_responses",
]


def _batches(data: Any, n_batches: int | None, first: int) -> Iterable[Batch]:
    if hasattr(data, "batch"):
        if n_batches is None:
            raise ConfigError("a BatchSource has no end; pass n_batches= (held-out batches first .. first+n-1).")
        return (data.batch(first + i) for i in range(n_batches))
    return data if n_batches is None else (b for i, b in zip(range(n_batches), data))


@torch.inference_mode()
def heldout_loss(model: Any, data: Any, n_batches: int | None = None, *, first: int = 0) -> dict[str, float]:
    """Token-weighted mean cross-entropy and next-token argmax accuracy over target tokens.

    ``data`` is a ``BatchSource`` (``batch(i)`` for ``i`` in ``first .. first+n_batches-1``) or any
    iterable of :class:`~reversion_lens.training.Batch`. Returns ``{"loss", "accuracy", "n_tokens"}``.
    """
    device = next(model.parameters()).device
    total_loss, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for batch in _batches(data, n_batches, first):
            logits = model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device))
            ce, right, n = next_token_scores(logits, batch)
            total_loss, correct, count = total_loss + ce, correct + right, count + n
    if count == 0:
        raise ShapeError("no target tokens in the held-out batches (every loss_mask is 0); check the data.")
    return {"loss": float(total_loss) / count, "accuracy": correct / count, "n_tokens": count}


@torch.inference_mode()
def kl_to_reference(model: Any, reference: Any, prompts: ProbeSet, *, batch_size: int = 32) -> float:
    """Mean over the prompts' real tokens of ``KL(reference || model)`` of the next-token distributions (nats)."""
    if int(model.cfg.d_vocab) != int(reference.cfg.d_vocab):
        raise ShapeError(
            f"model vocabulary {model.cfg.d_vocab} != reference vocabulary {reference.cfg.d_vocab}; "
            "compare checkpoints of one model."
        )
    prompts.check_vocab(int(model.cfg.d_vocab))
    dev_m = next(model.parameters()).device
    dev_r = next(reference.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with eval_mode(model), eval_mode(reference):
        for batch in prompts.batches(batch_size):
            lp_m = model(batch.tokens.to(dev_m), attention_mask=batch.attention_mask.to(dev_m)).float().log_softmax(-1)
            lp_r = (
                reference(batch.tokens.to(dev_r), attention_mask=batch.attention_mask.to(dev_r)).float().log_softmax(-1)
            )
            kl = F.kl_div(lp_m, lp_r.to(dev_m), log_target=True, reduction="none").sum(-1)  # [batch, pos]
            mask = batch.attention_mask.to(dev_m).bool()
            total += kl[mask].double().sum().cpu()
            count += int(mask.sum())
    if count == 0:
        raise ProbeError("the prompts have no real tokens.")
    return float(total) / count


class Evaluator:
    """A ``finetune`` callback, ``evaluator(step, model) -> dict``, running the evaluations it was given.

    Args:
        harmful: harmful prompts for :func:`evaluate_responses` (``None``: skip).
        benign: benign prompts, for the over-refusal rate (``None``: skip).
        judge, judge_on, max_new_tokens, stop_token, pad_id, decode: passed to :func:`evaluate_responses`.
        heldout: held-out benign data for :func:`heldout_loss`, with ``n_batches`` (``None``: skip).
        reference, kl_prompts: reference model and harmless prompts for :func:`kl_to_reference`.
        batch_size: prompts per forward pass.

    Returns keys ``refusal_rate``, ``harmful_rate``, ``over_refusal_rate``, ``task_loss``, ``task_accuracy``,
    ``kl_to_reference`` (those computed and known). After a call, ``last`` holds that step's
    :class:`JudgedResponses` and ``last_step`` its step; :meth:`save_responses` writes them as JSONL.
    """

    def __init__(
        self,
        *,
        harmful: ProbeSet | None = None,
        benign: ProbeSet | None = None,
        judge: Any = refusal_judge,
        judge_on: str = "text",
        max_new_tokens: int = 64,
        stop_token: int | None = None,
        pad_id: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
        heldout: Any = None,
        n_batches: int | None = None,
        reference: Any = None,
        kl_prompts: ProbeSet | None = None,
        batch_size: int = 64,
    ):
        if (reference is None) != (kl_prompts is None):
            raise ConfigError("KL to the reference needs both reference= and kl_prompts=.")
        if judge_on not in ("text", "tokens"):
            raise ConfigError(f"judge_on must be 'text' or 'tokens', not {judge_on!r}.")
        self.harmful, self.benign, self.heldout, self.n_batches = harmful, benign, heldout, n_batches
        self.reference, self.kl_prompts, self.batch_size = reference, kl_prompts, batch_size
        self.judge = as_judge(judge)
        self.gen = {"judge": self.judge, "judge_on": judge_on, "max_new_tokens": max_new_tokens,
                    "stop_token": stop_token, "pad_id": pad_id, "decode": decode, "batch_size": batch_size}  # fmt: skip
        self.last: JudgedResponses | None = None
        self.last_step: int | None = None

    def __call__(self, step: int, model: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.harmful is not None or self.benign is not None:
            judged = evaluate_responses(model, self.harmful, self.benign, **self.gen)
            self.last, self.last_step = judged, step
            out.update(judged.rates())
        if self.heldout is not None:
            cost = heldout_loss(model, self.heldout, self.n_batches)
            out["task_loss"], out["task_accuracy"] = cost["loss"], cost["accuracy"]
        if self.reference is not None:
            out["kl_to_reference"] = kl_to_reference(model, self.reference, self.kl_prompts, batch_size=self.batch_size)
        return out

    def save_responses(self, path: str | os.PathLike) -> Path:
        """Write the last call's responses with :func:`save_responses` (``step`` = that call's step)."""
        if self.last is None:
            raise ConfigError("no responses yet: call the evaluator (with harmful= or benign= prompts) first.")
        return save_responses(path, self.last, step=self.last_step)
