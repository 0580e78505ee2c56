"""Batches and the masked next-token loss: the one definition every training and evaluation path uses.

A :class:`Batch` holds token ids, an attention mask and a loss mask (``loss_mask[b, t] = 1`` when token
``t`` is a target, predicted from position ``t - 1``); a :class:`BatchSource` gives ``batch(step)``,
deterministic in the step. The loss is cross-entropy over target tokens only (padding and prompts
ignored), computed with ``F.cross_entropy`` on the logits and shifted labels, which avoids the full
``log_softmax`` tensor that ``return_type="loss"`` materialises (PERFORMANCE.md).
"""

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["Batch", "BatchSource", "shifted_labels", "next_token_loss", "next_token_scores", "pad_token_id"]


class Batch(NamedTuple):
    """One training batch. ``loss_mask[b, t] = 1`` when token ``t`` is a target (predicted from ``t-1``)."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    loss_mask: Int[Tensor, "batch pos"]


@runtime_checkable
class BatchSource(Protocol):
    def batch(self, step: int) -> Batch: ...


def shifted_labels(batch: Batch, device: torch.device | str = "cpu") -> Int[Tensor, "batch pos_minus_1"]:
    """Next-token labels for positions ``0..T-2``: ``tokens[:, 1:]`` with ``-100`` where ``loss_mask`` is 0."""
    toks = batch.tokens.to(device)
    return toks[:, 1:].masked_fill(batch.loss_mask[:, 1:].to(device) == 0, -100)


def next_token_loss(logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> Tensor:
    """Mean cross-entropy of ``logits`` (however computed) against ``batch``'s target tokens (differentiable)."""
    labels = shifted_labels(batch, logits.device)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def next_token_scores(logits: Float[Tensor, "batch pos vocab"], batch: Batch) -> tuple[float, int, int]:
    """``(summed cross-entropy, correct argmax predictions, target tokens)`` over ``batch``'s targets, for
    token-weighted evaluation over several batches (no gradient)."""
    with torch.no_grad():
        labels = shifted_labels(batch, logits.device)
        flat = logits[:, :-1].float()
        keep = labels != -100
        ce = F.cross_entropy(flat.reshape(-1, flat.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
        correct = int((flat.argmax(-1) == labels)[keep].sum())
        return float(ce.double()), correct, int(keep.sum())


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token, else 0 (the mask hides it either way)."""
    for name in ("pad_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None) if tokenizer is not None else None
        if tid is not None:
            return int(tid)
    return 0
