"""Batched greedy decoding for TransformerLens models, with attention masks and no KV cache.

Prompts are re-padded on the *left* internally, so every row's next token is read at the last
column and new tokens append on the right. With an attention mask, TransformerLens 4 derives the
position ids from the mask, so a left-padded row sees exactly what it would see alone
(TL4_GUIDE section 4). Each step reruns the whole sequence: fine for the short responses of the toy
world, quadratic for long ones.
"""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import ShapeError
from .probes import pad_sequences

__all__ = ["greedy_generate", "real_tokens"]


def real_tokens(tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None) -> list[list[int]]:
    """Each row's real tokens (mask 1), whatever the padding side; all of them without a mask."""
    if tokens.ndim != 2:
        raise ShapeError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}; add a batch axis with [None].")
    if attention_mask is None:
        return tokens.tolist()
    if attention_mask.shape != tokens.shape:
        raise ShapeError(
            f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {tuple(tokens.shape)}; "
            "pass a mask with 1 for real tokens and 0 for padding."
        )
    return [[t for t, m in zip(row, mrow) if m] for row, mrow in zip(tokens.tolist(), attention_mask.tolist())]


@torch.inference_mode()
def greedy_generate(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    max_new_tokens: int = 8,
    stop_token: int | None = None,
    pad_id: int = 0,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy (argmax) continuation of each prompt.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or legacy ``HookedTransformer``) whose
            forward accepts ``attention_mask``.
        tokens: the prompts, padded on either side.
        attention_mask: 1 for real tokens, 0 for padding; ``None`` means no padding.
        max_new_tokens: at most this many tokens are generated per prompt.
        stop_token: a row stops once it has generated this token; the stop token **is included** at
            the end of that row's output (so a response cut by ``max_new_tokens`` is recognisable by
            its missing stop token).
        pad_id: the id used for padding (never attended to: the mask hides it).
        batch_size: prompts per forward pass.

    Returns:
        One list of new token ids per prompt, in input order (the prompt itself is not repeated).
    """
    if max_new_tokens < 0:
        raise ShapeError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if batch_size < 1:
        raise ShapeError(f"batch_size must be >= 1, got {batch_size}.")
    prompts = real_tokens(tokens, attention_mask)
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    longest = max((len(p) for p in prompts), default=0)
    if n_ctx is not None and longest + max_new_tokens > n_ctx:
        raise ShapeError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {n_ctx}; lower max_new_tokens or shorten the prompts."
        )
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(_generate_batch(model, prompts[start : start + batch_size], max_new_tokens, stop_token, pad_id, device))
    return out


def _generate_batch(
    model: Any, prompts: Sequence[list[int]], max_new: int, stop: int | None, pad_id: int, device: torch.device
) -> list[list[int]]:
    toks, mask = pad_sequences(prompts, pad_id, padding_side="left")
    toks, mask = toks.to(device), mask.to(device)
    new = torch.empty(len(prompts), 0, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new):
        logits = model(toks, attention_mask=mask)
        nxt = logits[:, -1].argmax(-1)
        # Finished rows keep running (their extra tokens are dropped below); no holes in the mask.
        new = torch.cat([new, nxt[:, None]], dim=1)
        toks = torch.cat([toks, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        if stop is not None:
            done |= nxt == stop
            if bool(done.all()):
                break
    rows = new.tolist()
    if stop is None:
        return rows
    return [row[: row.index(stop) + 1] if stop in row else row for row in rows]
