"""A small, seeded fine-tuning loop for TransformerLens models.

Data is any object with ``batch(step) -> Batch``: a deterministic function of the step, so every arm of
an experiment sees the same data in the same order (paired comparisons) and a resumed run sees exactly
what an uninterrupted one would have.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

__all__ = ["Batch", "BatchSource", "OptimConfig", "lm_loss", "make_optimizer", "lr_at", "finetune"]


class Batch(NamedTuple):
    """One training batch. ``loss_mask[b, t] = 1`` when token ``t`` is a target (predicted from ``t-1``)."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    loss_mask: Int[Tensor, "batch pos"]


class BatchSource(Protocol):
    def batch(self, step: int) -> Batch: ...


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings, recorded with every run."""

    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    momentum: float = 0.0  # sgd only
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine" (to 10% of lr at the last step)
    grad_clip: float | None = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    from .errors import ConfigError

    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use 'adamw' or 'sgd'.")


def lr_at(cfg: OptimConfig, step: int, total: int) -> float:
    """Learning rate at 0-based ``step`` of ``total``: linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return cfg.lr


def lm_loss(model: Any, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy over target tokens (``loss_mask``), padding ignored.

    ``F.cross_entropy`` on the logits with shifted labels avoids the full ``log_softmax`` tensor that
    ``return_type="loss"`` materialises (PERFORMANCE.md).
    """
    device = next(model.parameters()).device
    toks = batch.tokens.to(device)
    logits = model(toks, attention_mask=batch.attention_mask.to(device))
    labels = toks[:, 1:].masked_fill(batch.loss_mask[:, 1:].to(device) == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def finetune(
    model: Any,
    data: BatchSource,
    steps: int,
    *,
    optim: OptimConfig = OptimConfig(),
    callbacks: Sequence[Callable[[int, Any], None]] = (),
    callback_steps: Sequence[int] = (),
    loss_fn: Callable[[Any, Batch], Tensor] = lm_loss,
    progress: bool = False,
    desc: str = "fine-tuning",
) -> list[float]:
    """Train ``model`` for ``steps`` steps on ``data``; returns the loss per step.

    ``callbacks`` are called as ``cb(step, model)`` after the update of each step in ``callback_steps``
    (1-based: step 1 = after the first update) and once at step 0 if 0 is listed.
    """
    from tqdm.auto import tqdm

    model.train()
    opt = make_optimizer(model, optim)
    wanted = set(callback_steps)
    if 0 in wanted:
        for cb in callbacks:
            cb(0, model)
    losses = []
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        for group in opt.param_groups:
            group["lr"] = lr_at(optim, step, steps)
        loss = loss_fn(model, data.batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if step + 1 in wanted:
            for cb in callbacks:
                cb(step + 1, model)
    return losses
