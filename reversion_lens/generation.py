"""Batched greedy decoding for TransformerLens models, with attention masks and, where it is right, a KV cache.

Prompts are re-padded on the *left* internally, so every row's next token is read at the last
column and new tokens append on the right. With an attention mask, TransformerLens 4 derives the
position ids from the mask, so a left-padded row sees exactly what it would see alone
(TL4_GUIDE section 4).

Three decoders give the same tokens (tests/test_generation.py checks each against ``transformers``' greedy
``generate`` on left-padded batches of the families in :data:`CACHE_VERIFIED_FAMILIES`):

* **no cache**: every step reruns the whole sequence through the model (quadratic; any TransformerLens model).
* **KV cache through the bridge**: one prompt forward, then one forward of the single new token per step
  through the bridge (``past_key_values=`` / ``return_type="logits_and_cache"``), so every hook point fires
  on every new token's forward. TransformerLens 4.3's own cache path is wrong with transformers 5.24: the
  decoder layers hand the cache to attention as ``cache=`` and the bridge's reconstructed attention only
  reads ``past_key_values=`` / ``layer_past=``, so nothing is written to the cache and each new token attends
  to itself alone (GPT-2 and Llama; GPT-NeoX still passes ``layer_past=``). While this decoder runs, a forward
  pre-hook on each attention bridge passes the cache under the name the bridge reads (removed afterwards).
* **KV cache through transformers** (the fast path, used when the only forward hooks on the bridge are at
  ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post``, i.e. ``hook_in`` / ``hook_out``, and it is not in
  compatibility mode): a plain transformers model of the same class that *shares* the bridge's parameter
  tensors (no copy) runs with its own cache, and each decoder layer's input and output go through the bridge's
  own ``hook_in`` / ``hook_out`` hook points, so interventions there (ablation, added directions, mean
  clamps) act on every new token. The bridge's components add Python overhead at every layer (a SmolLM2 block
  bridge took 1.9x the CPU time of its transformers decoder layer on one token); this path does not
  (benchmarks/bench_generate.py: 0.9-1.2x transformers' ``generate`` throughput, the bridge path 0.64-0.82x).

Hooks see only the new token's activations, ``[batch, 1, d_model]``, at each cached step; hooks that act per
position (projection, adding a direction) give the same tokens with or without the cache. A hook that indexes
absolute positions or reads the whole sequence needs ``cache=False``.
"""

import contextlib
import copy
import functools
import inspect
import warnings
import weakref
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
    from .hooks import active_interventions

    return [iv for iv in active_interventions(model) if getattr(iv, "per_input", False) and not iv.is_paused]


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
    plan = _plan(model, cache)
    device = next(model.parameters()).device
    if plan == "none":
        run: Any = functools.partial(_generate_batch, model)
        context: Any = contextlib.nullcontext()
    elif plan == "bridge":
        run, context = functools.partial(_cached_batch, _bridge_step(model)), _cache_alias(model)
    else:
        run, context = functools.partial(_cached_batch, _shadow_step(_shadow(model))), _quiet_cache_kwarg()
    out: list[list[int]] = []
    with context:
        for start in range(0, len(prompts), batch_size):
            out.extend(run(prompts[start : start + batch_size], max_new_tokens, stop_token, pad_id, device))
    return out


def _plan(model: Any, cache: bool | None) -> str:
    """Which decoder runs: ``"none"`` (no cache), ``"bridge"`` or ``"transformers"`` (the fast path)."""
    if cache is False:
        return "none"
    if cache is None and not cache_support(model)[0]:
        return "none"
    blocker = _cache_blocker(model)
    if blocker is not None:
        raise ConfigError(f"cache=True but {blocker}; pass cache=None (automatic) or cache=False.")
    return "transformers" if _fast_path_blocker(model) is None else "bridge"


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
    step: Any, prompts: Sequence[list[int]], max_new: int, stop: int | None, pad_id: int, device: torch.device
) -> list[list[int]]:
    """KV cache: one prompt forward, then one single-token forward per new token.

    ``step(tokens, mask, past)`` returns ``(last-position logits [batch, vocab], past)``; ``mask`` covers the
    cached columns as well as the new ones, so left-padded rows get the positions they would have alone.
    Finished rows keep running (their extra tokens are dropped), as in the no-cache decoder.
    """
    if max_new == 0:
        return [[] for _ in prompts]
    toks, mask = pad_sequences(prompts, pad_id, padding_side="left")
    toks, mask = toks.to(device), mask.to(device)
    new: list[Tensor] = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits, past = step(toks, mask, None)
    for i in range(max_new):
        nxt = logits.argmax(-1)
        new.append(nxt)
        if stop is not None:
            done |= nxt == stop
            if bool(done.all()):
                break
        if i == max_new - 1:
            break
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        logits, past = step(nxt[:, None], mask, past)
    return _stop_rows(torch.stack(new, 1).tolist(), stop)


def _bridge_step(model: Any) -> Any:
    """One cached forward through the bridge (it derives position ids from the mask)."""

    def step(toks: Tensor, mask: Tensor, past: Any) -> tuple[Tensor, Any]:
        if past is None:
            logits, past = model(toks, attention_mask=mask, return_type="logits_and_cache", use_cache=True)
        else:
            logits, past = model(toks, attention_mask=mask, return_type="logits_and_cache", past_key_values=past)
        return logits[:, -1], past

    return step


def _shadow_step(shadow: torch.nn.Module) -> Any:
    """One cached forward through the plain transformers model; position ids from the mask, as ``generate``."""

    # Only the last position's logits are needed (what generate asks for at the prompt forward too).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(shadow.forward).parameters else {}

    def step(toks: Tensor, mask: Tensor, past: Any) -> tuple[Tensor, Any]:
        positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)[:, -toks.shape[1] :]
        out = shadow(input_ids=toks, attention_mask=mask, position_ids=positions, past_key_values=past,
                     use_cache=True, **keep)  # fmt: skip
        return out.logits[:, -1], out.past_key_values

    return step


# ------------------------------------------------------------------ the fast path: a plain transformers twin
# bridge -> (its transformers twin, the twin's (name, tensor) pairs: all of them the bridge's own tensors)
_SHADOWS: "weakref.WeakKeyDictionary[Any, tuple[torch.nn.Module, list[tuple[str, Tensor]]]]" = (
    weakref.WeakKeyDictionary()
)


# Hooks that TransformerLens and transformers install on the wrapped model themselves (wired at the first
# forward): they capture outputs for ``output_hidden_states`` or feed hook points (``hook_mlp_in``, the
# split-qkv inputs) whose own hooks are checked separately. Any other forward hook sends decoding through the
# bridge: an unknown hook costs speed, never correctness.
_INTERNAL_HOOKS = frozenset({
    "install_output_capuring_hook.<locals>.output_capturing_hook",
    "BlockBridge._maybe_wire_capture_hooks.<locals>._capture_pre_ln1",
    "BlockBridge._maybe_wire_capture_hooks.<locals>._capture_mlp_in",
})  # fmt: skip


def _fast_path_blocker(model: Any) -> str | None:
    """Why the transformers twin cannot stand in for the bridge (``None``: it can)."""
    if getattr(model, "compatibility_mode", False):
        return "compatibility mode (processed weights)"
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return "no blocks"
    allowed = {id(b.hook_in) for b in blocks} | {id(b.hook_out) for b in blocks}
    for name, module in model.named_modules():
        if id(module) in allowed:
            continue
        for fn in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
            if getattr(fn, "__qualname__", "") not in _INTERNAL_HOOKS:
                return f"a forward hook on {name or 'the model'}"
    try:
        _shadow(model)
    except _NoShadow as e:
        return str(e)
    return None


class _NoShadow(Exception):
    pass


def _bridge_tensors(hf: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The wrapped model's parameters and buffers under plain transformers names (first occurrence wins)."""
    params: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    for key, t in hf.named_parameters(remove_duplicate=False):
        params.setdefault(key.replace("._original_component", ""), t)
    for key, t in hf.named_buffers(remove_duplicate=False):
        buffers.setdefault(key.replace("._original_component", ""), t)
    return params, buffers


def _shadow(model: Any) -> torch.nn.Module:
    """The transformers twin of ``model`` (built once, rebuilt when the bridge's tensors were replaced)."""
    hf = _hf_model(model)
    cached = _SHADOWS.get(model)
    if cached is not None:
        shadow, pairs = cached
        params, buffers = _bridge_tensors(hf)
        current = {**params, **buffers}
        if all(name in current and current[name] is t for name, t in pairs):
            shadow.train(model.training)
            return shadow
    shadow, pairs = _build_shadow(model, hf)
    _SHADOWS[model] = (shadow, pairs)
    shadow.train(model.training)
    return shadow


def _build_shadow(model: Any, hf: torch.nn.Module) -> tuple[torch.nn.Module, list[tuple[str, Tensor]]]:
    config = copy.deepcopy(hf.config)
    config._attn_implementation = "sdpa"  # what transformers' generate uses; the bridge runs eager
    try:
        with torch.device("meta"):
            shadow = type(hf)(config)
    except (TypeError, ValueError, AttributeError, RuntimeError, ImportError) as e:  # not rebuildable
        raise _NoShadow(f"{type(hf).__name__} could not be rebuilt from its config ({e})") from None
    params, buffers = _bridge_tensors(hf)
    missing = shadow.load_state_dict(params, strict=False, assign=True).missing_keys
    own_buffers = dict(shadow.named_buffers())
    for name, t in buffers.items():
        path, _, leaf = name.rpartition(".")
        try:
            module = shadow.get_submodule(path)
        except AttributeError:
            raise _NoShadow(f"the bridge holds a buffer {name!r} that {type(hf).__name__} has no module for") from None
        if name not in own_buffers and module._parameters.get(leaf, 0) is None:
            del module._parameters[leaf]  # e.g. the bridge's unembedding bias on a bias-free lm_head
        module.register_buffer(leaf, t, persistent=False)
    left = missing + [n for n, t in [*shadow.named_parameters(), *shadow.named_buffers()] if t.is_meta]
    if left:
        raise _NoShadow(f"the bridge has no tensor for {sorted(set(left))[:3]} of {type(hf).__name__}")
    layers = _decoder_layers(model, shadow)
    for layer, block in zip(layers, model.blocks):
        layer.register_forward_pre_hook(_input_hook(block.hook_in), with_kwargs=True)
        layer.register_forward_hook(_output_hook(block.hook_out))
    names = [n for n, _ in shadow.named_parameters(remove_duplicate=False)] + [n for n, _ in shadow.named_buffers()]
    flat = {**dict(shadow.named_parameters(remove_duplicate=False)), **dict(shadow.named_buffers())}
    return shadow.eval(), [(n, flat[n]) for n in names]


def _decoder_layers(model: Any, shadow: torch.nn.Module) -> torch.nn.ModuleList:
    path = getattr(getattr(model, "adapter", None), "component_mapping", {}).get("blocks")
    try:
        layers = shadow.get_submodule(path.name)
    except (AttributeError, TypeError):
        raise _NoShadow("the bridge's blocks map to no module list of the transformers model") from None
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != len(model.blocks):
        raise _NoShadow(f"{path.name} does not hold one layer per bridge block")
    return layers


def _input_hook(hook_in: torch.nn.Module) -> Any:
    def pre(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        if args:
            return (hook_in(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hook_in(kwargs["hidden_states"])}

    return pre


def _output_hook(hook_out: torch.nn.Module) -> Any:
    def post(module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (hook_out(output[0]), *output[1:])
        return hook_out(output)

    return post


@contextlib.contextmanager
def _quiet_cache_kwarg() -> Iterator[None]:
    with warnings.catch_warnings():
        # ``past_key_values=`` works on every transformers version; 5.24 renamed it ``cache=`` and warns.
        warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
        yield


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
        with _quiet_cache_kwarg():
            yield
    finally:
        for handle in handles:
            handle.remove()
