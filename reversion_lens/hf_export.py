"""Export a TransformerBridge over a Hugging Face model as a Hugging Face folder.

:func:`save_hf` writes ``config.json``, ``model.safetensors`` and the tokenizer, which
``AutoModelForCausalLM.from_pretrained(folder)`` and ``reversion_lens.specs.parse_spec(folder).load()`` read.

Why not ``bridge.original_model.save_pretrained()``: it fails (a view/stride error, TL4_GUIDE section 2),
because the bridge has put its own components into the Hugging Face module tree. The guide's workaround,
stripping ``._original_component`` from the keys of ``original_model.state_dict()``, is not enough after
fine-tuning on architectures with a fused QKV projection (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``): the
bridge splits it at boot into separate q/k/v linears and trains those. On GPT-2 the split pieces are views of the
fused weight, so it stays current; on GPT-NeoX (interleaved per head) they are copies, and the fused weight stays
at its loaded value (3 AdamW steps on a tiny NeoX: the stripped-keys export differs from the bridge by 0.85 in
the logits). :func:`hf_state_dict` therefore rebuilds every fused weight from the live q/k/v pieces, using the
bridge's own split function on an index probe to learn where each entry goes, and folds LoRA adapters
(:mod:`reversion_lens.lora`) into their base weights. :func:`save_hf` then checks that the exported weights
reproduce the bridge's logits before anything is renamed into place.
"""

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import SpecError
from .lora import replaced_folder
from .models import hf_module_name

__all__ = ["hf_state_dict", "is_hf_bridge", "save_hf"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def is_hf_bridge(model: Any) -> bool:
    """True for a ``TransformerBridge`` booted from a Hugging Face model (``boot_transformers``)."""
    from transformers import PreTrainedModel

    return isinstance(getattr(model, "original_model", None), PreTrainedModel)


def _require_hf_bridge(model: Any) -> None:
    if is_hf_bridge(model):
        return
    if type(getattr(model, "original_model", None)).__name__ == "NativeModel":
        raise SpecError(
            "this is a native TransformerBridge (boot_native): it has no Hugging Face model to export. Save it with "
            "reversion_lens.models.save_native(model, folder); that folder loads with load_native or as a model spec."
        )
    raise SpecError(
        f"save_hf exports a TransformerBridge booted from a Hugging Face model (boot_transformers); got "
        f"{type(model).__name__}."
    )


def _is_lora(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


@torch.no_grad()
def _effective(module: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` that ``module`` applies: a plain layer's own, or a LoRA layer's base plus its deltas."""
    if not _is_lora(module):
        return module.weight.detach(), None if getattr(module, "bias", None) is None else module.bias.detach()
    base = module.get_base_layer()
    w = base.weight.detach()
    if not module.merged and not module.disable_adapters:
        for name in module.active_adapters:
            if name in module.lora_A:
                w = w + module.get_delta_weight(name).to(w.dtype)
    return w, None if getattr(base, "bias", None) is None else base.bias.detach()


class _QKVProbe(torch.nn.Module):
    """Stands in for a fused-QKV attention module: its fused weight and bias hold their own flat indices."""

    def __init__(self, qkv_name: str, weight_shape: torch.Size, bias_shape: torch.Size | None):
        super().__init__()
        inner = torch.nn.Module()
        n = int(torch.Size(weight_shape).numel())
        inner.weight = torch.nn.Parameter(torch.arange(n, dtype=torch.float64).reshape(weight_shape), False)
        if bias_shape is not None:
            nb = int(torch.Size(bias_shape).numel())
            inner.bias = torch.nn.Parameter(torch.arange(nb, dtype=torch.float64).reshape(bias_shape), False)
        else:
            inner.bias = None
        self.add_module(qkv_name, inner)


def _scatter(where: list[Tensor], values: list[Tensor], like: Tensor, what: str) -> Tensor:
    """Put ``values[i]`` at the flat indices ``where[i]`` of a tensor like ``like`` (a bijection, or an error)."""
    n = like.numel()
    idx = torch.cat([w.reshape(-1) for w in where])
    as_int = idx.round()
    if not torch.equal(as_int, idx) or idx.numel() != n or as_int.min() < 0 or as_int.max() >= n:
        raise SpecError(f"cannot rebuild the fused {what}: the bridge's split is not a rearrangement of its entries.")
    as_int = as_int.long()
    count = torch.zeros(n, dtype=torch.long).index_add_(0, as_int, torch.ones_like(as_int))
    if not torch.all(count == 1):
        raise SpecError(f"cannot rebuild the fused {what}: the bridge's split does not use every entry exactly once.")
    out = torch.empty(n, dtype=like.dtype)
    out[as_int] = torch.cat([v.detach().reshape(-1).to("cpu", like.dtype) for v in values])
    return out.reshape(like.shape)


@torch.no_grad()
def _rebuild_fused_qkv(attn: Any) -> tuple[str, Tensor, Tensor | None]:
    """``(fused module name, weight, bias)`` of a ``JointQKVAttentionBridge`` from its live q/k/v pieces."""
    qkv_name = attn.submodules["qkv"].name
    fused = getattr(attn.original_component, qkv_name)
    weight = fused.weight
    bias = getattr(fused, "bias", None)
    probe = _QKVProbe(qkv_name, weight.shape, None if bias is None else bias.shape)
    try:
        pieces = attn.split_qkv_matrix(probe)
    except Exception as e:  # an architecture whose split reads more than the fused weight
        raise SpecError(
            f"cannot export {type(attn).__name__} ({attn.name}): its fused-QKV split could not be traced ({e})."
        ) from e
    live = [_effective(getattr(attn, p).original_component) for p in ("q", "k", "v")]
    for piece, (w, _) in zip(pieces, live):
        if piece.weight.shape != w.shape:
            raise SpecError(
                f"cannot rebuild {attn.name}.{qkv_name}: split shapes {tuple(piece.weight.shape)} vs {tuple(w.shape)}."
            )
    new_w = _scatter([p.weight for p in pieces], [w for w, _ in live], weight.detach().cpu(), f"{qkv_name}.weight")
    new_b = None
    if bias is not None:
        new_b = _scatter([p.bias for p in pieces], [b for _, b in live], bias.detach().cpu(), f"{qkv_name}.bias")
    return qkv_name, new_w, new_b


def _export_config(model: Any) -> Any:
    config = copy.deepcopy(model.original_model.config)
    if hasattr(config, "quantization_config"):  # GGUF loads: dequantized, the saved weights are plain
        del config.quantization_config
    config.output_attentions = False  # boot_transformers sets it for its hooks
    return config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _empty_model(cls: type, config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """``cls(config)`` in ``dtype`` on the CPU without random initialisation (the weights are overwritten)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, only slower
        no_init_weights = contextlib.nullcontext
    with no_init_weights(), _default_dtype(dtype if dtype.is_floating_point else torch.float32):
        return cls(config)


def _embedding_keys(hf: torch.nn.Module) -> tuple[str | None, str | None]:
    names = {id(m): n for n, m in hf.named_modules()}
    inp, out = hf.get_input_embeddings(), hf.get_output_embeddings()

    def key(m: Any) -> str | None:
        return None if m is None or id(m) not in names else f"{names[id(m)]}.weight"

    return key(inp), key(out)


def hf_state_dict(model: Any) -> tuple[Any, dict[str, Tensor]]:
    """The Hugging Face config and state dict that reproduce ``model`` (a ``boot_transformers`` bridge).

    Fused QKV weights are rebuilt from the bridge's live q/k/v linears and LoRA adapters are merged into
    their base weights (the model itself is not changed). Tied input/output embeddings whose values have
    drifted apart are exported untied (``tie_word_embeddings=False``) rather than losing one of them.

    Args:
        model: a ``TransformerBridge`` booted from a Hugging Face model.

    Returns:
        ``(config, state)``: a copy of the model's config (quantization config and ``output_attentions``
        dropped) and ``{Hugging Face key: CPU tensor}`` covering every key of a fresh model of that config.
    """
    _require_hf_bridge(model)
    orig = model.original_model
    config = _export_config(model)
    state: dict[str, Tensor] = {}
    for k, v in orig.state_dict().items():
        state.setdefault(hf_module_name(k), v)
    for path, mod in orig.named_modules(remove_duplicate=False):
        if _is_lora(mod):
            w, b = _effective(mod)
            state[f"{hf_module_name(path)}.weight"] = w
            if b is not None:
                state[f"{hf_module_name(path)}.bias"] = b
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import (
        JointQKVAttentionBridge,
    )

    done: set[int] = set()
    for path, mod in orig.named_modules(remove_duplicate=False):
        if isinstance(mod, JointQKVAttentionBridge) and id(mod) not in done:
            done.add(id(mod))
            qkv_name, w, b = _rebuild_fused_qkv(mod)
            state[f"{hf_module_name(path)}.{qkv_name}.weight"] = w
            if b is not None:
                state[f"{hf_module_name(path)}.{qkv_name}.bias"] = b
    with torch.device("meta"):
        meta = type(orig)(config)
    keys = set(meta.state_dict())
    inp, out = _embedding_keys(meta)
    if getattr(config, "tie_word_embeddings", False) and inp in state and out in state:
        if state[inp].shape != state[out].shape or not torch.equal(state[inp].cpu(), state[out].cpu()):
            config.tie_word_embeddings = False
    elif getattr(config, "tie_word_embeddings", False) and out not in state and inp in state:
        state[out] = state[inp]
    missing = sorted(keys - set(state))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise SpecError(f"cannot export {type(orig).__name__}: no value for {missing[:5]}{more}.")
    return config, {k: state[k].detach().to("cpu").contiguous() for k in sorted(keys)}


def _source_tokenizer(model: Any) -> Any:
    """The tokenizer as it was loaded (TransformerLens reloads it with ``add_bos_token=True``, which would change
    what ``AutoTokenizer`` gives for the exported folder); the bridge's own when the source cannot be read."""
    from transformers import AutoTokenizer

    src = getattr(model.cfg, "model_name", None)
    path = Path(src) if isinstance(src, str) else None
    try:
        if path is not None and path.is_file() and path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if path is not None and path.is_dir() and any((path / f).exists() for f in _TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError):
        pass
    return model.tokenizer


def _patch_tokenizer_class(folder: Path) -> None:
    # transformers 5 writes "TokenizersBackend", which transformers 4.x cannot load; a tokenizer.json loads as
    # PreTrainedTokenizerFast in both.
    import json

    path = folder / "tokenizer_config.json"
    if not path.exists() or not (folder / "tokenizer.json").exists():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2))


@torch.no_grad()
def _check_logits(model: Any, hf: torch.nn.Module) -> None:
    d_vocab, n_ctx = int(model.cfg.d_vocab), int(getattr(model.cfg, "n_ctx", 16) or 16)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, d_vocab, (1, min(8, n_ctx)), generator=g)
    was_training = model.training
    model.eval()
    try:
        ours = model(toks.to(model.cfg.device), return_type="logits").double().cpu()
    finally:
        model.train(was_training)
    theirs = hf.eval()(toks).logits.double()
    low = next(hf.parameters()).dtype in (torch.float16, torch.bfloat16)
    tol = (3e-2 if low else 1e-4) * max(1.0, float(ours.abs().max()))
    diff = float((ours - theirs).abs().max())
    if not diff <= tol:
        raise RuntimeError(
            f"the exported weights do not reproduce the bridge (max logit difference {diff:.3g} > {tol:.3g}); nothing "
            "was written. Remove hooks added with add_hook(..., is_permanent=True) before saving; otherwise this "
            f"architecture ({type(hf).__name__}) keeps weights where the export does not look."
        )


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_hf(
    model: Any,
    folder: str | os.PathLike,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    check: bool = True,
) -> Path:
    """Write ``model`` as a Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer), atomically.

    The folder is assembled under a temporary name next to ``folder`` and renamed into place, so ``folder``
    is either absent, the old one, or complete. LoRA adapters are merged into the saved weights (the model
    keeps its adapters; :func:`reversion_lens.lora.save_lora_adapter` saves the adapters alone).

    Args:
        model: a ``TransformerBridge`` from ``boot_transformers`` (also a GGUF spec's); a native bridge
            raises :class:`SpecError` pointing to :func:`reversion_lens.models.save_native`.
        folder: the output folder.
        tokenizer: the tokenizer to save; default: the one at the model's source (``cfg.model_name``) as it
            was loaded, else ``model.tokenizer``.
        overwrite: replace an existing ``folder`` (otherwise an existing folder is an error).
        check: before writing, check that the exported weights give the bridge's logits on a short random
            sequence (eval mode; tolerance 1e-4, 3e-2 for 16-bit weights, times ``max(1, max|logit|)``).
            Costs one forward pass of each.

    Returns:
        The folder's path. Memory: one extra copy of the weights while saving.
    """
    _require_hf_bridge(model)
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise SpecError(f"{folder} already exists; pass overwrite=True to replace it, or choose a new folder.")
    config, state = hf_state_dict(model)
    dtype = next(iter(v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    hf = _empty_model(type(model.original_model), config, dtype)
    result = hf.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - set(_tied_targets(hf)):
        raise SpecError(
            f"cannot export: keys missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}."
        )
    if getattr(config, "tie_word_embeddings", False):
        hf.tie_weights()
    del state
    if check:
        _check_logits(model, hf)
    with replaced_folder(folder) as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok = tokenizer if tokenizer is not None else _source_tokenizer(model)
        if tok is not None and hasattr(tok, "save_pretrained"):
            tok.save_pretrained(tmp)
            _patch_tokenizer_class(tmp)
        _fsync_tree(tmp)
    return folder


def _tied_targets(hf: torch.nn.Module) -> list[str]:
    return list(getattr(hf, "_tied_weights_keys", None) or {})  # transformers 5: {target: source}, 4: [target]
