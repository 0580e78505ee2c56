"""LoRA fine-tuning of a TransformerBridge (``peft`` adapters inside the bridge's own components).

Where the adapters go. ``boot_transformers`` puts a bridge component around every Hugging Face module it
knows (``blocks.{l}.attn.o`` is a ``LinearBridge`` whose ``original_component`` is ``o_proj``); the
component's hooks fire around whatever module it wraps. :func:`apply_lora` replaces that wrapped module by
a ``peft`` LoRA layer *after* booting, so

* every hook point keeps firing, and a LoRA layer's output is inside its component's ``hook_out`` (the
  residual hooks ``blocks.{l}.hook_attn_out`` / ``hook_resid_post`` see ``W x + s B A x``);
* it works on architectures with a fused QKV projection. There the bridge splits ``c_attn`` /
  ``query_key_value`` into new q/k/v linears at boot and runs those, so LoRA injected into the Hugging Face
  model *before* booting (``boot_transformers(..., hf_model=peft_model)``) is silently bypassed for q/k/v:
  measured on tiny models with random adapters, bridge vs peft logits differ by 2.9 (GPT-2) and 2.0
  (GPT-NeoX), and agree exactly (0.0) on Llama;
* parameter names are the bridge's as before, with ``.base_layer`` / ``.lora_A.default`` /
  ``.lora_B.default`` inside the wrapped module (either injection point gives the same names, because the
  bridge wraps the peft layers just as it wraps plain ones). ``bridge.state_dict()`` keys change the same
  way while adapters are in; :func:`merge_lora` restores them.

Targets are named per block by component, ``"attn.q"``, ``"attn.k"``, ``"attn.v"``, ``"attn.o"``,
``"mlp.in"``, ``"mlp.gate"``, ``"mlp.out"`` (what the architecture has), or by the Hugging Face module
name (``"o_proj"``, ``"down_proj"``; GPT-2's ``"c_proj"`` names both ``attn.o`` and ``mlp.out``, as it does
in peft). Fused ``c_attn`` / ``query_key_value`` are not targets: the bridge runs the split q/k/v instead.

Update-space blocking with LoRA. The residual-writing adapters (:func:`lora_residual_writers`) are those of
``attn.o`` and ``mlp.out``; their ``B`` matrices ``[d_model, r]`` carry the d_model axis. LoRA initialises
``B = 0``, so keeping ``v^T B = 0`` (:func:`project_lora_update` after each optimizer step) keeps the
update ``ΔW = s B A`` exactly orthogonal to ``v`` under any optimizer, AdamW included; the projection of the
full weight under AdamW does not hold (TL4_GUIDE section 3: 8e-2 after 20 steps).

Export: :func:`reversion_lens.hf_export.save_hf` writes the merged model as a Hugging Face folder (the
bridge keeps its adapters), :func:`merge_lora` merges in place, :func:`save_lora_adapter` writes a peft
adapter folder for ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)``.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import ConfigError, ShapeError, SpecError
from .models import hf_module_name

__all__ = [
    "LoraWriter",
    "apply_lora",
    "lora_layers",
    "lora_parameters",
    "lora_residual_writers",
    "lora_targets",
    "merge_lora",
    "project_lora_update",
    "save_lora_adapter",
]

ADAPTER = "default"
_PARTS = ("attn", "mlp")
_FUSED = ("qkv",)
_WRITERS = ("attn.o", "mlp.out")


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise ConfigError("LoRA needs the peft package: pip install peft") from e
    return peft


def _bridge_linears(model: Any, layer: int) -> dict[str, Any]:
    """``{"attn.o": LinearBridge, ...}`` of block ``layer``: the linear components its forward runs."""
    from transformer_lens.model_bridge.generalized_components.linear import LinearBridge

    block = model.blocks[layer]
    out = {}
    for part in _PARTS:
        comp = getattr(block, part, None)
        if comp is None:
            continue
        for sub, m in comp._modules.items():
            if isinstance(m, LinearBridge) and sub not in _FUSED and m._modules.get("_original_component") is not None:
                out[f"{part}.{sub}"] = m
    return out


def lora_targets(model: Any) -> dict[str, str]:
    """The target names :func:`apply_lora` accepts: ``{component name: Hugging Face module name}`` of block 0."""
    return {k: str(m.name) for k, m in _bridge_linears(model, 0).items()}


def _resolve_targets(model: Any, target_modules: Sequence[str] | str | None) -> list[str]:
    available = lora_targets(model)
    if target_modules is None or target_modules == "all-linear":
        return list(available)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    chosen: list[str] = []
    for t in target_modules:
        hits = [k for k, hf in available.items() if t in (k, hf)]
        if not hits:
            raise ConfigError(
                f"no LoRA target {t!r} in {model.cfg.model_name}: choose among {sorted(available)} (component "
                f"names) or {sorted(set(available.values()))} (Hugging Face names). Fused QKV projections "
                "(c_attn, query_key_value) are split by the bridge; target attn.q / attn.k / attn.v."
            )
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _parents(model: Any) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """``{id(module): [(parent, attribute name), ...]}`` over the bridge and its Hugging Face tree.

    A module can have several parents: GPT-2's ``c_proj`` is both ``attn.o``'s wrapped module and the Hugging
    Face attention's attribute; every one of them must see the replacement.
    """
    modules = {id(m): m for m in model.modules()}
    modules.update((id(m), m) for m in model.original_model.modules())
    out: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for parent in modules.values():
        for name, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, name))
    return out


def _replace(parents: dict[int, list[tuple[torch.nn.Module, str]]], old: torch.nn.Module, new: torch.nn.Module) -> None:
    for parent, name in parents.get(id(old), []):
        parent._modules[name] = new


def apply_lora(
    model: Any,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] | str | None = None,
    *,
    dropout: float = 0.0,
    layers: Sequence[int] | None = None,
    seed: int = 0,
) -> list[str]:
    """Add LoRA adapters to a ``boot_transformers`` bridge in place and freeze everything else.

    Args:
        model: a ``TransformerBridge`` over a Hugging Face model.
        r: adapter rank.
        alpha: LoRA alpha; the update is ``(alpha / r) * B @ A``.
        target_modules: component names (``"attn.o"``, ``"mlp.out"``, ...) or Hugging Face module names
            (``"o_proj"``); ``None`` or ``"all-linear"``: every linear of attention and MLP.
        dropout: LoRA dropout (active in ``model.train()`` only).
        layers: blocks to adapt (default: all).
        seed: seeds ``A``'s initialisation (Kaiming uniform; ``B`` starts at zero, so the model's output is
            unchanged); the global RNG is left as it was.

    Returns:
        The adapted labels, ``blocks.{l}.{component}``. Afterwards exactly the ``lora_A`` / ``lora_B``
        weights have ``requires_grad=True``; train with ``AdamW(lora_parameters(model))``.
    """
    peft = _require_peft()
    from transformers.pytorch_utils import Conv1D

    if lora_layers(model):
        raise ConfigError("this model already has LoRA adapters; merge_lora(model) first, or load a fresh model.")
    if r < 1:
        raise ConfigError(f"LoRA rank r must be >= 1, got {r}.")
    targets = _resolve_targets(model, target_modules)
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if any(not 0 <= x < n_layers for x in layers):
        raise ConfigError(f"layers {layers} out of range for a {n_layers}-layer model.")
    picked: list[tuple[str, Any]] = []
    for layer in layers:
        comps = _bridge_linears(model, layer)
        picked += [(f"blocks.{layer}.{t}", comps[t]) for t in targets if t in comps]
    for p in model.parameters():
        p.requires_grad_(False)
    groups: dict[bool, list[tuple[str, Any]]] = {}
    for label, comp in picked:
        groups.setdefault(isinstance(comp.original_component, Conv1D), []).append((label, comp))
    parents = _parents(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for conv1d, items in groups.items():
            holder = torch.nn.Module()
            for i, (_, comp) in enumerate(items):
                holder.add_module(f"t{i}", comp.original_component)
            config = peft.LoraConfig(
                r=r,
                lora_alpha=alpha,
                lora_dropout=dropout,
                fan_in_fan_out=conv1d,
                target_modules=[f"t{i}" for i in range(len(items))],
                bias="none",
            )
            peft.inject_adapter_in_model(config, holder)
            for i, (_, comp) in enumerate(items):
                _replace(parents, comp.original_component, getattr(holder, f"t{i}"))
    for layer in lora_layers(model).values():
        for p in layer.parameters():
            p.requires_grad_(False)
        for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
            p.requires_grad_(True)
    return [label for label, _ in picked]


def lora_layers(model: Any) -> dict[str, Any]:
    """``{"blocks.{l}.{component}": peft LoRA layer}`` for every adapted component, in layer order."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    out = {}
    for layer in range(int(model.cfg.n_layers)):
        for name, comp in _bridge_linears(model, layer).items():
            if isinstance(comp.original_component, LoraLayer):
                out[f"blocks.{layer}.{name}"] = comp.original_component
    return out


def lora_parameters(model: Any) -> list[torch.nn.Parameter]:
    """Every ``lora_A`` and ``lora_B`` weight (what the optimizer should get)."""
    layers = lora_layers(model).values()
    return [p for layer in layers for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())]


@dataclass(frozen=True)
class LoraWriter:
    """A LoRA adapter whose product ``B A`` writes to the residual stream.

    Attributes:
        label: ``blocks.{l}.attn.o.lora_B`` or ``blocks.{l}.mlp.out.lora_B``.
        layer: the block ``l``.
        B: ``lora_B`` weight ``[d_model, r]``.
        axis: the d_model axis of ``B`` (0), as in ``interventions.residual_write_params``.
    """

    label: str
    layer: int
    B: torch.nn.Parameter
    axis: int = 0

    def astuple(self) -> tuple[str, int, torch.nn.Parameter, int]:
        """``(label, layer, parameter, axis)``, the row format of ``interventions.residual_write_params``."""
        return (self.label, self.layer, self.B, self.axis)


def lora_residual_writers(model: Any, layers: Sequence[int] | None = None) -> list[LoraWriter]:
    """The adapters of ``attn.o`` and ``mlp.out`` (the residual writers), with ``B``'s d_model axis.

    ``vᵀ (B A) = (vᵀ B) A``, so ``vᵀ B = 0`` makes the adapter's whole update orthogonal to ``v``.
    """
    d_model = int(model.cfg.d_model)
    keep = None if layers is None else {int(x) for x in layers}
    out = []
    for label, layer in lora_layers(model).items():
        l_idx = int(label.split(".")[1])
        if keep is not None and l_idx not in keep:
            continue
        if label.split(".", 2)[2] in _WRITERS:
            B = layer.lora_B[ADAPTER].weight
            if B.shape[0] != d_model:
                raise ShapeError(f"{label}.lora_B has shape {tuple(B.shape)}; expected d_model={d_model} rows.")
            out.append(LoraWriter(f"{label}.lora_B", l_idx, B, 0))
    return out


def _layer_vectors(v_per_layer: Any, d_model: int) -> dict[int, Tensor]:
    if isinstance(v_per_layer, Mapping):
        vs = {int(k): torch.as_tensor(v) for k, v in v_per_layer.items()}
    else:
        t = torch.as_tensor(v_per_layer)
        if t.ndim != 2:
            raise ShapeError(
                f"v_per_layer must be [n_layers, d_model] or {{layer: [d_model]}}; got shape {tuple(t.shape)}."
            )
        vs = dict(enumerate(t))
    for layer, v in vs.items():
        if v.shape != (d_model,):
            raise ShapeError(f"the vector for layer {layer} has shape {tuple(v.shape)}; expected ({d_model},).")
    return vs


@torch.no_grad()
def project_lora_update(
    model: Any,
    v_per_layer: Float[Tensor, "layer d_model"] | Mapping[int, Float[Tensor, " d_model"]],
    pinned: Mapping[str, Float[Tensor, " r"]] | None = None,
) -> float:
    """Project ``v`` out of the output rows of every residual-writing ``B``: ``B ← B − v (vᵀB − pinned)``.

    Call it after each optimizer step (``opt.register_step_post_hook``). With LoRA's ``B = 0`` start and
    ``pinned`` zero, it keeps ``vᵀB = 0`` and so ``vᵀ ΔW = vᵀ (s B A) = 0`` exactly, whatever the optimizer.

    Args:
        model: a bridge with adapters (:func:`apply_lora`).
        v_per_layer: unit vectors ``[n_layers, d_model]`` (row ``l`` for block ``l``) or ``{layer: v}``
            (layers not given are left alone). Vectors are normalised here.
        pinned: ``{writer label: vᵀB}`` to hold instead of zero (e.g. the values when blocking started).

    Returns:
        The largest ``|vᵀB − pinned|`` removed (how far the step had moved ``B`` along ``v``).
    """
    vs = _layer_vectors(v_per_layer, int(model.cfg.d_model))
    worst = 0.0
    for w in lora_residual_writers(model, layers=list(vs)):
        v = vs[w.layer].to(w.B)
        v = v / v.norm()
        target = 0.0 if pinned is None or w.label not in pinned else pinned[w.label].to(w.B)
        excess = v @ w.B - target
        worst = max(worst, float(excess.abs().max()))
        w.B.sub_(torch.outer(v, excess))
    return worst


@torch.no_grad()
def merge_lora(model: Any) -> Any:
    """Merge every adapter into its base weight in place and remove the LoRA layers; returns ``model``.

    The base weight is updated in place (GPT-2's split q/k/v are views of ``c_attn`` and stay so). All
    parameters are trainable again afterwards, as after loading.
    """
    parents = _parents(model)
    for layer in lora_layers(model).values():
        base = layer.get_base_layer()
        if not layer.merged:
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    base.weight.add_(layer.get_delta_weight(name).to(base.weight.dtype))
        _replace(parents, layer, base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _hf_paths(model: Any) -> dict[int, str]:
    """``{id(LoRA layer): Hugging Face module path}`` for adapters on modules the Hugging Face model has."""

    orig = model.original_model
    config = orig.config
    with torch.device("meta"):
        keys = set(type(orig)(config).state_dict())
    ids = {id(m) for m in lora_layers(model).values()}
    out: dict[int, str] = {}
    for path, mod in orig.named_modules(remove_duplicate=False):
        if id(mod) in ids and f"{hf_module_name(path)}.weight" in keys:
            out.setdefault(id(mod), hf_module_name(path))
    return out


def save_lora_adapter(model: Any, folder: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters alone as a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Load it with ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)``. Written
    atomically (a temporary folder renamed into place; an existing folder is replaced).

    Args:
        model: a bridge with adapters (:func:`apply_lora`).
        folder: the output folder.
        base_model_name_or_path: recorded in the config; default ``model.cfg.model_name``.

    Returns:
        The folder. Adapters on the bridge's split q/k/v of a fused-QKV architecture (GPT-2, GPT-NeoX) have no
        module of their own in the Hugging Face model: :class:`SpecError` (export merged with ``save_hf``).
    """
    peft = _require_peft()
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    layers = lora_layers(model)
    if not layers:
        raise ConfigError("this model has no LoRA adapters (apply_lora first); save the whole model with save_hf.")
    paths = _hf_paths(model)
    orphans = [label for label, layer in layers.items() if id(layer) not in paths]
    if orphans:
        raise SpecError(
            f"{orphans[:3]}{' ...' if len(orphans) > 3 else ''} adapt the bridge's split q/k/v of a fused QKV "
            "projection, which the Hugging Face model does not have as modules; save the merged model with "
            "reversion_lens.hf_export.save_hf, or adapt attn.o / mlp modules only."
        )
    first = next(iter(layers.values()))
    r, alpha = int(first.r[ADAPTER]), float(first.lora_alpha[ADAPTER])
    dropout = first.lora_dropout[ADAPTER]
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(getattr(dropout, "p", 0.0)),
        target_modules=sorted(paths[id(x)] for x in layers.values()),
        fan_in_fan_out=isinstance(first.get_base_layer(), Conv1D),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path or str(model.cfg.model_name),
    )
    tensors = {}
    for layer in layers.values():
        p = f"base_model.model.{paths[id(layer)]}"
        tensors[f"{p}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().cpu().contiguous()
        tensors[f"{p}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach().cpu().contiguous()
    folder = Path(folder)
    with replaced_folder(folder) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    return folder


@contextlib.contextmanager
def replaced_folder(folder: Path) -> Iterator[Path]:
    """Yield a new empty folder beside ``folder`` to write into; if the block succeeds it is renamed to ``folder``
    (replacing an existing one), if it raises it is deleted and ``folder`` is left as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
