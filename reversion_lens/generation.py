"""Batched greedy decoding for TransformerLens models, with attention masks and, where it is right, a KV cache.

Prompts are re-padded on the *left* internally, so every row's next token is read at the last
column and new tokens append on the right. With an attention mask, TransformerLens 4 derives the
position ids from the mask, so a left-padded row sees exactly what it would see alone
(TL4_GUIDE section 4).

Two decoders give the same tokens:

* **no cache**: every step reruns the whole sequence (quadratic; any TransformerLens model).
* **KV cache**: one prompt forward, then one forward of the single new token per step through the bridge
  (``past_key_values=`` / ``return_type="logits_and_cache"``), so every hook point still fires on every
  new token's forward. TransformerLens 4.3's own cache path is wrong with transformers 5.24: the decoder
  layers hand the cache to attention as ``cache=`` and the bridge's reconstructed attention only reads
  ``past_key_values=`` / ``layer_past=``, so nothing is written to the cache and each new token attends to
  itself alone (GPT-2 and Llama; GPT-NeoX still passes ``layer_past=``). While the cached decoder runs, a
  forward pre-hook on each attention bridge passes the cache under the name the bridge reads; it is
  removed afterwards. Checked token for token against ``transformers``' greedy ``generate`` on left-padded
  batches for the families in :data:`CACHE_VERIFIED_FAMILIES` (tests/test_generation.py).

Hooks (interventions, ``model.hooks(...)``) see only the new token's activations, ``[batch, 1, d_model]``,
at each cached step; hooks that act per position (projection, adding a direction) give the same tokens with
or without the cache. A hook that indexes absolute positions or reads the whole sequence needs ``cache=False``.
"""

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import ConfigError, ShapeError
from .probes import pad_sequences

__all__ = ["CACHE_VERIFIED_FAMILIES", "cache_support", "greedy_generate", "real_tokens"]

#: Hugging Face ``model_type`` values whose cached decoding is tested against ``transformers``' ``generate``.
CACHE_VERIFIED_FAMILIES: frozenset[str] = frozenset({"gpt2", "gpt_neox", "llama"})


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


def _hf_model(model: Any) -> Any:
    """The wrapped Hugging Face model of a ``TransformerBridge`` booted from transformers, else ``None``."""
    underlying = getattr(getattr(model, "_driver", None), "underlying_model", None)
    if getattr(getattr(underlying, "config", None), "model_type", None) is None:
        return None  # boot_native bridges (NativeModel), legacy HookedTransformer, other drivers
    return underlying


def _blocking_clamps(model: Any) -> list[Any]:
    """Attached, unpaused per-input clamps: they rerun a reference model on each call's full input."""
    from .interventions import active_interventions

    return [
        iv for iv in active_interventions(model) if getattr(iv, "per_input", False) and not getattr(iv, "_paused", 0)
    ]


def _cache_blocker(model: Any) -> str | None:
    """Why ``model`` cannot be decoded with a KV cache at all (``None``: it can)."""
    hf = _hf_model(model)
    if hf is None:
        return (
            f"{type(model).__name__} has no Hugging Face model with a KV cache (boot_native bridges and legacy "
            "HookedTransformer decode without one)"
        )
    if getattr(hf.config, "is_encoder_decoder", False):
        return f"{hf.config.model_type!r} is an encoder-decoder model"
    clamps = _blocking_clamps(model)
    if clamps:
        return f"a per-input clamp is attached ({clamps[0]!r}); it reruns its reference on each call's full input"
    return None


def cache_support(model: Any) -> tuple[bool, str]:
    """Whether :func:`greedy_generate` decodes ``model`` with a KV cache by default, and why (not).

    Returns:
        ``(True, family)`` for a ``TransformerBridge`` over a Hugging Face decoder of a family in
        :data:`CACHE_VERIFIED_FAMILIES` with no active (unpaused) per-input clamp; otherwise
        ``(False, reason)``.
    """
    blocker = _cache_blocker(model)
    if blocker is not None:
        return False, blocker
    family = _hf_model(model).config.model_type
    if family not in CACHE_VERIFIED_FAMILIES:
        return False, (
            f"cached decoding of the {family!r} family is not verified against transformers' generate (verified: "
            f"{sorted(CACHE_VERIFIED_FAMILIES)}); pass cache=True to use it anyway"
        )
    return True, family


@torch.inference_mode()
def greedy_generate(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    max_new_tokens: int = 8,
    stop_token: int | None = None,
    pad_id: int = 0,
    batch_size: int = 64,
    *,
    cache: bool | None = None,
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
            its missing stop token). Rows stop independently.
        pad_id: the id used for padding (never attended to: the mask hides it).
        batch_size: prompts per forward pass.
        cache: ``None`` (default): use the KV cache where :func:`cache_support` allows it, else rerun the
            whole sequence each step. ``True``: require the cache (any bridge over a Hugging Face decoder,
            verified family or not); :class:`~reversion_lens.errors.ConfigError` where there is none or an
            unpaused per-input clamp is attached. ``False``: never use it.

    Returns:
        One list of new token ids per prompt, in input order (the prompt itself is not repeated).
    """
    if max_new_tokens < 0:
        raise ShapeError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if batch_size < 1:
        raise ShapeError(f"batch_size must be >= 1, got {batch_size}.")
    if cache not in (None, True, False):
        raise ConfigError(f"cache must be None (automatic), True or False, got {cache!r}.")
    prompts = real_tokens(tokens, attention_mask)
    n_ctx = getattr(getattr(model, "cfg", None), "n_ctx", None)
    longest = max((len(p) for p in prompts), default=0)
    if n_ctx is not None and longest + max_new_tokens > n_ctx:
        raise ShapeError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {n_ctx}; lower max_new_tokens or shorten the prompts."
        )
    use_cache = _resolve_cache(model, cache)
    decode = _cached_batch if use_cache else _generate_batch
    device = next(model.parameters()).device
    out: list[list[int]] = []
    with _cache_alias(model) if use_cache else contextlib.nullcontext():
        for start in range(0, len(prompts), batch_size):
            out.extend(decode(model, prompts[start : start + batch_size], max_new_tokens, stop_token, pad_id, device))
    return out


def _resolve_cache(model: Any, cache: bool | None) -> bool:
    if cache is False:
        return False
    if cache is None:
        return cache_support(model)[0]
    blocker = _cache_blocker(model)
    if blocker is not None:
        raise ConfigError(f"cache=True but {blocker}; pass cache=None (automatic) or cache=False.")
    return True


def _stop_rows(rows: list[list[int]], stop: int | None) -> list[list[int]]:
    if stop is None:
        return rows
    return [row[: row.index(stop) + 1] if stop in row else row for row in rows]


def _generate_batch(
    model: Any, prompts: Sequence[list[int]], max_new: int, stop: int | None, pad_id: int, device: torch.device
) -> list[list[int]]:
    """No cache: every step reruns the whole (growing) sequence."""
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
    return _stop_rows(new.tolist(), stop)


def _cached_batch(
    model: Any, prompts: Sequence[list[int]], max_new: int, stop: int | None, pad_id: int, device: torch.device
) -> list[list[int]]:
    """KV cache: one prompt forward, then one single-token forward per new token, all through the bridge.

    The bridge derives each row's position ids from the (growing) mask, so left-padded rows get the
    positions they would have alone; the mask covers the cached columns as well as the new one.
    Finished rows keep running (their extra tokens are dropped), as in the no-cache decoder.
    """
    if max_new == 0:
        return [[] for _ in prompts]
    toks, mask = pad_sequences(prompts, pad_id, padding_side="left")
    toks, mask = toks.to(device), mask.to(device)
    new: list[Tensor] = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits, past = model(toks, attention_mask=mask, return_type="logits_and_cache", use_cache=True)
    for step in range(max_new):
        nxt = logits[:, -1].argmax(-1)
        new.append(nxt)
        if stop is not None:
            done |= nxt == stop
            if bool(done.all()):
                break
        if step == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        logits, past = model(nxt[:, None], attention_mask=mask, return_type="logits_and_cache", past_key_values=past)
    return _stop_rows(torch.stack(new, 1).tolist(), stop)


def _alias_cache_kwarg(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    # transformers 5.24 decoder layers pass the cache as ``cache=``; the bridge's attention reads
    # ``past_key_values=`` (or ``layer_past=``) and would otherwise neither extend nor fill it.
    if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


@contextlib.contextmanager
def _cache_alias(model: Any) -> Iterator[None]:
    """Pre-hooks on every attention bridge handing it the cache under the name it reads; removed on exit."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, AttentionBridge):
                handles.append(module.register_forward_pre_hook(_alias_cache_kwarg, with_kwargs=True))
        with warnings.catch_warnings():
            # The bridge's documented entry point is ``past_key_values=``; transformers 5.24 renamed it ``cache=``.
            warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
            yield
    finally:
        for handle in handles:
            handle.remove()
