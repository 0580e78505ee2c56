"""A fused forward pass for training TL-native models fast on CPU: same weights, same function, no hooks.

The toy history's two phases (1 040 AdamW steps per seed) are most of the demo's CPU time. Through the
bridge, each step pays for hook points, a Python LayerNorm and the native attention's softmax, which
torch runs ~10x slower per element when its last dimension is under 16 (PERFORMANCE.md). Pretraining
needs none of the hooks, so :func:`fused_logits` computes the same logits straight from the native
module's parameters with ``F.layer_norm`` and ``F.scaled_dot_product_attention``: one AdamW step of the
default toy model drops from ~70 ms to ~45 ms on one thread (``benchmarks/bench_fused.py``).

It covers the architecture the toy world builds (LayerNorm, learned or rotary positions, GELU-family
MLP, full multi-head attention, no soft-caps). :func:`supports_fused` says whether a model is covered;
:func:`fused_lm_loss` falls back to the bridge's forward for anything else, so it is always safe to use.
Tests check logits and gradients against the bridge to float32 rounding.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import Batch, next_token_loss
from ..training import lm_loss

__all__ = ["supports_fused", "fused_logits", "fused_lm_loss"]


def _raw(module: Any) -> Any:
    """The plain torch module inside a bridge component (the bridge wraps modules in place)."""
    while getattr(module, "original_component", None) is not None:
        module = module.original_component
    return module


def _native(model: Any) -> Any:
    from transformer_lens.model_bridge.sources.native.model import NativeModel

    inner = getattr(model, "original_model", model)
    return inner if isinstance(inner, NativeModel) else None


def _hooked(model: Any) -> bool:
    """Any forward or backward hook attached anywhere (an intervention, a cache): the fused path would
    skip it. The bridge's own capture hooks (``_capture_hook_handles``, wired on the first forward)
    only feed hook points, so they do not count."""
    internal = {h.id for m in model.modules() for h in getattr(m, "_capture_hook_handles", ())}
    return any(
        key not in internal
        for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
        for key in hooks
    )


def supports_fused(model: Any) -> bool:
    """True when ``model`` is (a bridge around) a native model whose layout :func:`fused_logits` computes,
    with no hook attached (hooks only fire through the model's own forward)."""
    nat = _native(model)
    if nat is None or _hooked(model):
        return False
    cfg = nat.cfg
    if float(getattr(cfg, "output_logits_soft_cap", 0) or 0) > 0 or type(_raw(nat.ln_out)) is not torch.nn.LayerNorm:
        return False
    for wrapped in nat.layers:
        blk = _raw(wrapped)
        a = _raw(blk.attn)
        if (
            cfg.attn_only
            or type(_raw(blk.ln1)) is not torch.nn.LayerNorm
            or type(_raw(getattr(blk, "ln2", None))) is not torch.nn.LayerNorm
            or type(_raw(blk.mlp)).__name__ != "NativeMLP"
            or _raw(blk.mlp).ln is not None
            or a.kv_repeats != 1
            or a.attn_scores_soft_cap > 0
            or not a.causal
        ):
            return False
    return True


def _ln(x: Tensor, ln: torch.nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def fused_logits(model: Any, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """The logits ``model(tokens, attention_mask=attention_mask)`` returns, at every real (unmasked)
    position, computed without hook points (no hook fires, so interventions do not apply).

    Position ids are derived from the mask as the bridge derives them (``cumsum - 1``), so left- and
    right-padded batches both match. Raises ``ValueError`` for a model :func:`supports_fused` rejects.
    """
    if not supports_fused(model):
        raise ValueError(
            "fused_logits covers TL-native LayerNorm models with a plain MLP and full attention and no hooks "
            "attached; call the model itself (or use fused_lm_loss, which falls back to it) for this one."
        )
    return _fused_logits(_native(model), tokens, attention_mask)


def _fused_logits(nat: Any, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
    """:func:`fused_logits` for a native model already checked by :func:`supports_fused`."""
    B, T = tokens.shape
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.to(tokens.device)
    position_ids = mask.long().cumsum(-1) - 1
    position_ids = position_ids.masked_fill(mask == 0, 1)
    keep = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril() & mask.bool()[:, None, None, :]
    # A query row with every key masked (a left pad) softmaxes to NaN in SDPA; the native attention
    # zeroes such rows. Let them attend to themselves instead: they feed nothing real (causal, masked).
    keep = keep | torch.eye(T, dtype=torch.bool, device=tokens.device)
    x = _raw(nat.tok_embed)(tokens)
    if nat.pos is not None:
        x = x + _raw(nat.pos)(position_ids)
    for wrapped in nat.layers:
        blk = _raw(wrapped)
        a = _raw(blk.attn)
        h = _ln(x, _raw(blk.ln1))
        q, k, v = (_raw(lin)(h).view(B, T, a.n_heads, a.d_head).transpose(1, 2) for lin in (a.q, a.k, a.v))
        if a.rotary is not None:
            q, k = _raw(a.rotary).apply_rope(q, k, position_ids=position_ids)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0 / a.scale)
        x = x + _raw(a.o)(o.transpose(1, 2).reshape(B, T, -1))
        m = _raw(blk.mlp)
        x = x + _raw(m.fc_out)(m.act(_raw(m.fc_in)(_ln(x, _raw(blk.ln2)))))
    return _raw(nat.head)(_ln(x, _raw(nat.ln_out)))


def fused_lm_loss(model: Any, batch: Batch) -> Tensor:
    """:func:`~reversion_lens.training.lm_loss` through :func:`fused_logits` (the bridge's forward when
    the model is not covered): a drop-in ``loss_fn`` for :func:`~reversion_lens.training.finetune`."""
    if not supports_fused(model):
        return lm_loss(model, batch)
    device = next(model.parameters()).device
    return next_token_loss(
        _fused_logits(_native(model), batch.tokens.to(device), batch.attention_mask.to(device)), batch
    )
