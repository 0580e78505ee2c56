"""The one map from a *site* in the residual stream to hook names, for every supported model.

=============  ==============================================  ===========================================
site           TransformerLens 4 ``TransformerBridge``          legacy ``HookedTransformer`` (duck-typed)
=============  ==============================================  ===========================================
resid_pre      ``blocks.{l}.hook_resid_pre`` (= ``hook_in``)    ``blocks.{l}.hook_resid_pre``
resid_mid      ``blocks.{l}.hook_resid_mid``: the MLP branch    ``blocks.{l}.hook_resid_mid`` (trunk)
               input (``ln2.hook_in``); absent on parallel
               attention+MLP models such as Pythia/GPT-NeoX
resid_post     ``blocks.{l}.hook_resid_post`` (= ``hook_out``)  ``blocks.{l}.hook_resid_post``
attn_out       ``blocks.{l}.hook_attn_out``                     ``blocks.{l}.hook_attn_out``
mlp_out        ``blocks.{l}.hook_mlp_out``                      ``blocks.{l}.hook_mlp_out``
ln1_in         ``blocks.{l}.ln1.hook_in``: what the attention   none (the legacy LayerNorm hooks only
               branch's norm reads (= resid_pre's value)        ``hook_scale`` / ``hook_normalized``)
ln1_out        ``blocks.{l}.ln1.hook_out``: what attention      none
               reads (after the norm's weight and bias)
ln2_in         ``blocks.{l}.ln2.hook_in``: what the MLP         none
               branch's norm reads (= resid_mid; resid_pre
               on parallel attention+MLP models)
ln2_out        ``blocks.{l}.ln2.hook_out``: what the MLP reads  none
ln_final_in    ``ln_final.hook_in``, last layer only            none
               (= the last resid_post's value)
ln_final_out   ``ln_final.hook_out``, last layer only: what     none
               the unembedding reads
=============  ==============================================  ===========================================

Reading ``resid_mid`` on a sequential TL4 model gives the trunk value; writing to it (or projecting its
gradient) only changes the MLP branch, so interventions use :func:`residual_write_hooks` instead: every
write to the trunk is covered by ``resid_pre`` + ``attn_out`` + ``resid_post`` (TL4_GUIDE section 3).

The layer-norm sites (:data:`NORM_SITES`, steering-vectors' ``input_layernorm`` /
``post_attention_layernorm`` layer types) exist on every TL4 bridge (GPT-2, GPT-NeoX, Llama and native
models checked on TransformerLens 4.3.0; a native model with ``normalization_type=None`` has them as
identities). They are *branch* sites: reading them is exact, but writing to one changes only what that
norm's branch (attention, MLP or unembedding) reads, never the residual trunk (:data:`BRANCH_SITES`). ``ln_final_*`` belong to the last layer:
``hook_name(model, "ln_final_out", -1)``; any other layer is a :class:`SiteError`.
"""

from collections.abc import Iterable, Sequence

import torch

from .errors import SiteError

__all__ = [
    "SITES",
    "RESIDUAL_SITES",
    "NORM_SITES",
    "BRANCH_SITES",
    "hook_name",
    "hook_names",
    "check_layers",
    "n_layers",
    "d_model",
    "d_vocab",
    "residual_write_hooks",
    "is_bridge",
    "model_signature",
    "unembedding",
    "all_modules",
]

RESIDUAL_SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
NORM_SITES: tuple[str, ...] = ("ln1_in", "ln1_out", "ln2_in", "ln2_out", "ln_final_in", "ln_final_out")
SITES: tuple[str, ...] = RESIDUAL_SITES + NORM_SITES
# Writing here changes one branch's input, not the residual trunk (resid_mid: on TL4 bridges only).
BRANCH_SITES: frozenset[str] = frozenset(NORM_SITES)

_NORM_HOOKS = {
    "ln1_in": "blocks.{layer}.ln1.hook_in",
    "ln1_out": "blocks.{layer}.ln1.hook_out",
    "ln2_in": "blocks.{layer}.ln2.hook_in",
    "ln2_out": "blocks.{layer}.ln2.hook_out",
    "ln_final_in": "ln_final.hook_in",
    "ln_final_out": "ln_final.hook_out",
}


def is_bridge(model: object) -> bool:
    """True for a TransformerLens 4 ``TransformerBridge`` (the legacy class is handled by duck typing)."""
    try:
        from transformer_lens import TransformerBridge
    except ImportError:  # pragma: no cover - TL < 3
        return False
    return isinstance(model, TransformerBridge)


def _cfg(model: object):
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "hook_dict"):
        raise SiteError(
            f"{type(model).__name__} is not a TransformerLens model (no .cfg / .hook_dict). Load it with "
            "reversion_lens.load_model or TransformerBridge.boot_transformers / boot_native."
        )
    return cfg


def n_layers(model: object) -> int:
    return int(_cfg(model).n_layers)


def d_model(model: object) -> int:
    return int(_cfg(model).d_model)


def d_vocab(model: object) -> int:
    return int(_cfg(model).d_vocab)


def model_signature(model: object) -> dict[str, int]:
    """What two checkpoints of one history must share."""
    return {"n_layers": n_layers(model), "d_model": d_model(model), "d_vocab": d_vocab(model)}


def check_layers(model: object, layers: Iterable[int] | int | None) -> tuple[int, ...]:
    """Normalise a layer selection to a sorted tuple of valid indices (``None`` = all layers).

    Negative indices count from the end, as in Python.
    """
    n = n_layers(model)
    if layers is None:
        return tuple(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if not isinstance(layer, (int,)) or isinstance(layer, bool):
            raise SiteError(f"layer {layer!r} is not an integer; pass layer indices such as [0, 2].")
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise SiteError(f"layer {layer} is out of range for a model with {n} layers; use 0..{n - 1}.")
        out.append(idx)
    if not out:
        raise SiteError("empty layer selection; pass None for all layers or a non-empty list.")
    if len(set(out)) != len(out):
        raise SiteError(f"duplicate layers in {list(layers)}; list each layer once.")
    return tuple(sorted(out))


def hook_name(model: object, site: str, layer: int) -> str:
    """The hook name for ``site`` at ``layer``; an unknown or absent site is a :class:`SiteError`."""
    if site not in SITES:
        raise SiteError(f"unknown site {site!r}; choose one of {', '.join(SITES)}.")
    (layer,) = check_layers(model, [layer])
    if site in _NORM_HOOKS:
        return _norm_hook_name(model, site, layer)
    name = f"blocks.{layer}.hook_{site}"
    if name not in model.hook_dict:  # type: ignore[attr-defined]
        extra = ""
        if site == "resid_mid":
            extra = (
                " Models with parallel attention and MLP (Pythia, GPT-NeoX, GPT-J) have no resid_mid;"
                " use resid_pre or resid_post."
            )
        raise SiteError(f"{type(model).__name__} has no site {site!r} (no hook {name!r}).{extra}")
    return name


def _norm_hook_name(model: object, site: str, layer: int) -> str:
    last = n_layers(model) - 1
    if site.startswith("ln_final") and layer != last:
        raise SiteError(
            f"site {site!r} is the final norm, which belongs to the last layer ({last}) only, not layer {layer}; "
            f"pass layers=[{last}] (or [-1])."
        )
    name = _NORM_HOOKS[site].format(layer=layer)
    if name not in model.hook_dict:  # type: ignore[attr-defined]
        raise SiteError(
            f"{type(model).__name__} has no site {site!r} (no hook {name!r}): layer-norm sites need a TransformerLens "
            "4 bridge (the legacy HookedTransformer has none). Use a residual site (resid_pre, resid_post, attn_out, "
            "mlp_out)."
        )
    return name


def hook_names(model: object, site: str, layers: Sequence[int] | None = None) -> list[str]:
    return [hook_name(model, site, layer) for layer in check_layers(model, layers)]


def residual_write_hooks(model: object, layer: int) -> list[str]:
    """Hook points that together cover every write of block ``layer`` to the residual trunk.

    ``resid_pre`` (what enters), ``attn_out`` (the attention write, absent from the trunk hooks of a
    TL4 sequential block) and ``resid_post`` (what leaves, covering the MLP write). Projecting the
    gradient at all three makes every residual-writing weight's gradient orthogonal to the direction.
    """
    names = [hook_name(model, "resid_pre", layer)]
    attn = f"blocks.{layer}.hook_attn_out"
    if attn in model.hook_dict:  # type: ignore[attr-defined]
        names.append(attn)
    names.append(hook_name(model, "resid_post", layer))
    return names


def unembedding(model: object) -> torch.Tensor:
    """The unembedding matrix ``[d_model, vocab]`` (TL4 bridges and legacy models both expose ``W_U``)."""
    W_U = getattr(model, "W_U", None)
    if W_U is None:
        raise SiteError(f"{type(model).__name__} exposes no W_U; cannot read directions through the unembedding.")
    return W_U.detach()


def all_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every distinct submodule, including a TL4 bridge's ``original_model`` (kept outside ``_modules``)."""
    seen: dict[int, torch.nn.Module] = {id(m): m for m in model.modules()}
    original = getattr(model, "original_model", None)
    if isinstance(original, torch.nn.Module):
        seen.update((id(m), m) for m in original.modules())
    return list(seen.values())
