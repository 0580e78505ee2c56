"""``update``: after each optimizer step, :meth:`UpdateBlock.after_step` removes the ``v`` component,
along the ``d_model`` axis, of the update of every residual-writing weight of the blocked layers
(``blocks.{l}.attn.o`` and ``blocks.{l}.mlp.out`` weights and biases; ``embed`` and ``pos_embed``
for layer 0): it keeps ``v^T W`` equal to its value at :meth:`attach`, so gradient steps, Adam
scaling and weight decay all leave it unchanged. Guarantees ``max|v^T (W_t - W_0)| ~ 0`` for those
weights under any optimizer. Does not: block other weights (LayerNorm, Q/K/V, MLP input) whose
change alters what the writing weights read, so the activations' ``v`` component still moves; with
tied embeddings the unembedding shares the pinned matrix; the optimizer's moment estimates still hold
``v`` components (only the realised update is projected). Needs the loop to call ``after_step``
(``finetune`` does) or ``optimizer=`` (a step post-hook).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..directions import Direction
from ..errors import ConfigError, SiteError
from ..registry import MODES
from ..sites import check_layers
from .base import Intervention

__all__ = ["UpdateBlock", "residual_write_params"]

def residual_write_params(model: Any, layers: Sequence[int] | None = None) -> list[tuple[str, int, torch.nn.Parameter, int]]:
    """``(label, layer, parameter, d_model axis)`` for every weight writing to the residual stream.

    Per layer: ``blocks.{l}.attn.o`` and ``blocks.{l}.mlp.out`` (weight and bias); for layer 0 also
    ``embed`` and ``pos_embed`` (rotary models have none). The axis is found from the wrapped module's
    type (``nn.Linear``: 0; ``nn.Embedding`` and Hugging Face ``Conv1D``: 1; biases: 0).
    """
    D = int(model.cfg.d_model)
    out = []
    for layer in check_layers(model, layers):
        labels = [f"blocks.{layer}.attn.o", f"blocks.{layer}.mlp.out"]
        if layer == 0:
            labels = ["embed", "pos_embed"] + labels
        for label in labels:
            mod = _get_module(model, label)
            if mod is None:
                optional = label == "pos_embed" or (label.endswith("mlp.out") and getattr(model.cfg, "attn_only", False))
                if optional:  # rotary models have no position embedding, attention-only ones no MLP
                    continue
                raise SiteError(
                    f"{type(model).__name__} has no module {label!r}; the update block supports TransformerLens 4 "
                    "bridges (blocks.{l}.attn.o, blocks.{l}.mlp.out, embed, pos_embed). Use mode='grad' instead."
                )
            inner = getattr(mod, "original_component", None) or mod
            for pname in ("weight", "bias"):
                p = getattr(inner, pname, None)
                if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                    out.append((f"{label}.{pname}", layer, p, _d_model_axis(inner, p, D, label)))
    return out


def _get_module(model: Any, path: str) -> Any:
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _d_model_axis(module: torch.nn.Module, p: Tensor, D: int, label: str) -> int:
    if p.ndim == 1:
        axis = 0
    elif isinstance(module, torch.nn.Linear):
        axis = 0
    elif isinstance(module, torch.nn.Embedding) or type(module).__name__ == "Conv1D":
        axis = 1
    else:
        axes = [i for i, n in enumerate(p.shape) if n == D]
        if len(axes) != 1:
            raise SiteError(f"cannot tell which axis of {label} {tuple(p.shape)} is d_model={D}; use mode='grad'.")
        axis = axes[0]
    if p.shape[axis] != D:
        raise SiteError(f"{label} has shape {tuple(p.shape)}; expected d_model={D} on axis {axis}.")
    return axis


def _v_component(p: Tensor, v: Tensor, axis: int) -> Tensor:
    return torch.tensordot(v, p, dims=([0], [0])) if axis == 0 else p @ v


class UpdateBlock(Intervention):
    """``update``: keep ``v^T W`` of residual-writing weights fixed across optimizer steps."""

    mode = "update"

    def __init__(self, model: Any, direction: Direction, layers: Sequence[int] | int | None = None, *, optimizer: torch.optim.Optimizer | None = None):
        super().__init__(model, direction, layers)
        self.params = residual_write_params(model, self.layers)
        self.optimizer = optimizer
        self._pinned: list[Tensor] = []
        self._opt_handle: Any = None

    def _on_attach(self) -> None:
        with torch.no_grad():
            self._pinned = [_v_component(p, self.direction[layer].to(p), axis).clone() for _, layer, p, axis in self.params]
        if self.optimizer is not None:
            self._opt_handle = self.optimizer.register_step_post_hook(lambda opt, *_: self.after_step(self.model, opt))

    def _on_remove(self) -> None:
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None

    @torch.no_grad()
    def after_step(self, model: Any, optimizer: torch.optim.Optimizer) -> None:
        if self._paused or not self._attached:
            return
        for (_, layer, p, axis), c in zip(self.params, self._pinned):
            v = self.direction[layer].to(p)
            excess = _v_component(p, v, axis) - c
            if axis == 0:
                p.sub_(v.reshape(-1, *([1] * (p.ndim - 1))) * excess)
            else:
                p.sub_(excess[:, None] * v)

    def state_dict(self) -> dict[str, Tensor]:
        return {label: c for (label, *_), c in zip(self.params, self._pinned)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        labels = [label for label, *_ in self.params]
        if sorted(state) != sorted(labels):
            raise ConfigError(f"update-block state holds {sorted(state)}, expected {sorted(labels)}; it is from another run.")
        self._pinned = [state[label].to(p) for label, _, p, _ in self.params]


MODES.register("update", UpdateBlock, needs=(), color="#000000", doc="keep v^T W of every residual-writing weight fixed across optimizer steps")
