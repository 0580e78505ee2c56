"""Weight orthogonalization: a permanent edit after which no layer can write one vector to the residual stream.

For a unit vector ``r``, every matrix that writes the residual stream is replaced by its projection
orthogonal to ``r`` along the ``d_model`` axis, ``W <- W - r (r^T W)`` (andyrdt/refusal_direction,
``pipeline/utils/utils.py``, ``get_orthogonalized_matrix``): the token embedding, the learned position
embedding where there is one (GPT-2; rotary models have none), and each layer's attention output and MLP
output weights, **and their biases** (GPT-2, GPT-NeoX and native models have them; the Llama-family models
refusal_direction edits do not). The edited model computes what
:func:`reversion_lens.steering.ablate_everywhere` computes with hooks (every ``resid_pre``, ``attn_out``
and ``mlp_out`` orthogonal to ``r``), up to float rounding.

Tied embeddings (GPT-2, SmolLM2, ``save_tiny_llama(tied=True)``): the unembedding is the embedding
matrix, so orthogonalizing the embedding also orthogonalizes the unembedding, and the logits become
``(h - (h.r) r) W_U``: the model can no longer *read* ``r`` from its final norm's output either (1.59 in
logits on SmolLM2, PEERS.md). ``tied="untie"`` (default) first gives the unembedding its own copy of the
matrix, so only the writes change and the model equals hook ablation; the Hugging Face config then says
``tie_word_embeddings=False`` and ``lm_head.weight`` is a separate parameter, which an export of
``bridge.original_model.state_dict()`` must save (the folder grows by one ``[vocab, d_model]`` matrix).
``tied="keep"`` keeps one matrix (refusal_direction's behaviour), equivalent to also ablating ``r`` at
``ln_final_out``.

The edit is in place, in the parameters of the bridge's wrapped modules (``bridge.original_model`` for a
Hugging Face model), so ``bridge.state_dict()``, ``original_model.state_dict()`` and an exporter of it
all hold the edited weights. To keep the original, load the model a second time or ``copy.deepcopy`` it
first (on TL 4.3 that fails for a Hugging Face bridge once it has run a forward pass with gradients; it
works on a fresh one or after ``torch.no_grad()`` passes).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .directions import Direction
from .errors import ConfigError, SiteError
from .sites import check_layers, d_model
from .steering import unit_vector

__all__ = ["Writer", "orthogonalized", "residual_writers", "untie_embeddings", "orthogonalize", "embeddings_tied"]


def orthogonalized(weight: Tensor, vector: Float[Tensor, " d_model"], axis: int) -> Tensor:
    """``W - r (r^T W)`` along ``axis`` (the ``d_model`` axis), in float64, returned in ``weight``'s dtype.

    ``r`` is ``vector`` normalised. For ``nn.Linear`` weights ``[d_model, d_in]`` the axis is 0, for
    embeddings ``[vocab, d_model]`` and Hugging Face ``Conv1D`` weights ``[d_in, d_model]`` it is 1, for
    biases ``[d_model]`` 0. Afterwards ``r^T W = 0`` along that axis.
    """
    r = vector.detach().double().to(weight.device)
    r = r / r.norm()
    w = weight.detach().double().movedim(axis, -1)
    w = w - (w @ r)[..., None] * r
    return w.movedim(-1, axis).to(weight.dtype)


@dataclass(frozen=True)
class Writer:
    """One parameter that writes the residual stream: ``getattr(module, name)``, ``d_model`` on ``axis``."""

    label: str  # e.g. "blocks.0.attn.o.weight"
    module: torch.nn.Module
    name: str  # "weight" or "bias"
    axis: int

    @property
    def parameter(self) -> torch.nn.Parameter:
        return getattr(self.module, self.name)


def _module(model: Any, path: str) -> Any:
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            return None
    return getattr(obj, "original_component", None) or obj


def _writer_module(model: Any, path: str, unsupported: str) -> Any:
    """The (unwrapped) module at ``path``, or ``None`` where the architecture has none (rotary models: no
    ``pos_embed``; attention-only ones: no ``mlp.out``); any other missing module is a :class:`SiteError`
    ending in ``unsupported`` (which models the caller supports, and what to use instead)."""
    mod = _module(model, path)
    if mod is None:
        optional = path == "pos_embed" or (path.endswith("mlp.out") and getattr(model.cfg, "attn_only", False))
        if not optional:
            raise SiteError(f"{type(model).__name__} has no module {path!r}; {unsupported}")
    return mod


def _axis(module: torch.nn.Module, p: Tensor, D: int, label: str, advice: str = "") -> int:
    """The ``d_model`` axis of ``p`` (a parameter of ``module``): 0 for biases and ``nn.Linear``, 1 for embeddings
    and Hugging Face ``Conv1D``, else the one axis of size ``D`` (``advice`` ends the error when there is none)."""
    if p.ndim == 1 or isinstance(module, torch.nn.Linear):
        axis = 0
    elif isinstance(module, torch.nn.Embedding) or type(module).__name__ == "Conv1D":
        axis = 1
    else:
        axes = [i for i, n in enumerate(p.shape) if n == D]
        if len(axes) != 1:
            raise SiteError(f"cannot tell which axis of {label} {tuple(p.shape)} is d_model={D}{advice}.")
        axis = axes[0]
    if p.shape[axis] != D:
        raise SiteError(f"{label} has shape {tuple(p.shape)}; expected d_model={D} on axis {axis}.")
    return axis


_UNSUPPORTED = (
    "weight orthogonalization supports TransformerLens 4 bridges (embed, pos_embed, blocks.{l}.attn.o, "
    "blocks.{l}.mlp.out). Use ablate_everywhere (hooks)."
)


def residual_writers(model: Any, layers: Sequence[int] | None = None) -> list[Writer]:
    """Every parameter that writes the residual stream of a TransformerLens 4 bridge.

    ``embed`` and ``pos_embed`` (learned positions only), then per layer ``blocks.{l}.attn.o`` and
    ``blocks.{l}.mlp.out``, weight and bias where present. Frozen parameters are included.
    """
    D = d_model(model)
    chosen = check_layers(model, layers)
    paths = ["embed", "pos_embed"] if chosen[0] == 0 else []
    for layer in chosen:
        block = model.blocks[layer]
        post_norms = [n for n in ("ln1_post", "ln2_post") if getattr(block, n, None) is not None]
        if post_norms:
            raise SiteError(
                f"block {layer} normalises its branch outputs ({', '.join(post_norms)}; Gemma 2/3 style), so removing "
                "r from the output weights does not remove it from the residual writes. Use ablate_everywhere (hooks)."
            )
        paths += [f"blocks.{layer}.attn.o", f"blocks.{layer}.mlp.out"]
    out = []
    for path in paths:
        mod = _writer_module(model, path, _UNSUPPORTED)
        if mod is None:
            continue
        for name in ("weight", "bias"):
            p = getattr(mod, name, None)
            if isinstance(p, torch.nn.Parameter):
                out.append(Writer(f"{path}.{name}", mod, name, _axis(mod, p, D, f"{path}.{name}")))
    return out


def embeddings_tied(model: Any) -> bool:
    """Whether the unembedding shares its matrix with the token embedding."""
    emb, head = _module(model, "embed"), _module(model, "unembed")
    if emb is None or head is None:
        return False
    a, b = getattr(emb, "weight", None), getattr(head, "weight", None)
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return False
    return a is b or (a.shape == b.shape and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def untie_embeddings(model: Any) -> bool:
    """Give the unembedding its own copy of a tied embedding matrix; returns whether they were tied.

    Also sets ``tie_word_embeddings=False`` on the Hugging Face config (and the bridge's ``cfg``) and
    clears the model's tied-weights map, so saving and reloading keeps the two matrices apart.
    """
    if not embeddings_tied(model):
        return False
    emb, head = _module(model, "embed"), _module(model, "unembed")
    head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    hf = getattr(model, "original_model", None)
    config = getattr(hf, "config", None)
    if config is not None:
        configs = [config]
        text = getattr(config, "get_text_config", lambda: config)()
        if text is not config:
            configs.append(text)
        for c in configs:
            if hasattr(c, "tie_word_embeddings"):
                c.tie_word_embeddings = False
        if hasattr(hf, "all_tied_weights_keys"):
            hf.all_tied_weights_keys = {}
    if hasattr(model.cfg, "tie_word_embeddings"):
        model.cfg.tie_word_embeddings = False
    return True


@torch.no_grad()
def orthogonalize(model: Any, vector: Tensor | Direction, *, tied: str = "untie") -> Any:
    """Edit ``model`` in place so that no layer can write ``vector`` to the residual stream; return it.

    Args:
        model: a TransformerLens 4 bridge (native or Hugging Face).
        vector: ``[d_model]`` (normalised here) or a one-layer :class:`~reversion_lens.Direction`.
        tied: with tied embeddings, ``"untie"`` (default: the unembedding keeps the unedited matrix, and the
            model equals :func:`~reversion_lens.steering.ablate_everywhere`) or ``"keep"`` (one edited matrix:
            the unembedding can no longer read ``vector`` either). Ignored for untied models.

    Returns:
        ``model``, whose residual-writing parameters (:func:`residual_writers`) now satisfy ``r^T W = 0``
        along ``d_model``; the parameter objects are the same (optimisers and references stay valid), except
        the new unembedding parameter when untying.
    """
    if tied not in ("untie", "keep"):
        raise ConfigError(
            f"tied={tied!r}; use 'untie' (the unembedding keeps its own copy) or 'keep' (shared, edited)."
        )
    r = unit_vector(vector, model)
    writers = residual_writers(model)
    if tied == "untie":
        untie_embeddings(model)
    for w in writers:
        p = w.parameter
        p.copy_(orthogonalized(p, r, w.axis))
    return model
