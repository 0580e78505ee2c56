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

Gaps of ``update`` (kept as it is: per layer): each layer's writers are pinned along that layer's own ``v_l``
only, so the writes of earlier layers reach layer ``l`` with their ``v_l`` component free (8-layer toy: final
cosines 0.42-0.76); the embeddings are pinned along ``v_0`` only; parameters with ``requires_grad=False`` are
skipped by :func:`residual_write_params` (harmless while they stay frozen, but the writes of LoRA adapters,
``B A`` inside a frozen ``attn.o`` / ``mlp.out``, are then not blocked at all, silently); with tied embeddings
the pin also freezes the unembedding's ``v_0`` row.

``update-cum`` (:class:`CumulativeUpdateBlock`) is the update-space block exact under any optimizer for
**every** weight that writes the residual stream (:func:`reversion_lens.orthogonalize.residual_writers`: token
and position embeddings, each layer's ``attn.o`` and ``mlp.out`` weights and biases, frozen ones included):
after each optimizer step the writers of layer ``j`` are reset along the span ``U_j`` of v_rev at every
blocked layer ``l >= j`` (the embeddings: every blocked layer; ``shared=True``: one span at every writer), so
``U_j^T W`` stays at its value at :meth:`attach` (to the rounding of the parameters' dtype). Guarantees:
``max |u^T (W_t - W_0)| ~ 0`` for every writer ``W`` of a layer ``<= l`` and every ``u`` of layer ``l``'s
(sub)space, under AdamW with weight decay, so the residual at layer ``l`` moves along ``v_l`` only through
changed reads: ``v_l . (h_l(x; t) - h_l(x; 0)) = sum_j v_l^T W_j(0) (a_j(x; t) - a_j(x; 0))``, at every input
and position. Tied embeddings: ``tied="keep"`` (default) pins the shared matrix, so the unembedding's read of
every blocked direction is frozen too (``u^T W_U`` fixed; it can still change how it reads everything else);
``tied="untie"`` gives the unembedding its own trainable copy first (the model then has one ``[vocab,
d_model]`` matrix more than the other arms; only with a loop that builds its optimizer after attaching, as
``finetune`` does). Does not: constrain the reads, or the optimizer's moments (only the realised weights are
projected). With LoRA adapters (:func:`reversion_lens.lora.apply_lora`: every base weight frozen) it is the
SafeLoRA-style projection of the adapter update: the ``B`` ``[d_model, r]`` of every ``attn.o`` / ``mlp.out``
adapter of layer ``j`` keeps ``U_j^T B`` at its value at attach (0 from LoRA's ``B = 0`` start), so the
adapter's write ``s B A x`` has no component in ``U_j`` and the guarantee above holds for the adapted model
(adapters on Q/K/V or the MLP input are reads: not constrained); other trainable parameters beside the
adapters are refused.
"""

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..directions import Direction, Subspace, as_subspace
from ..errors import ConfigError
from ..lora import lora_layers, lora_residual_writers
from ..orthogonalize import _axis, _writer_module, embeddings_tied, residual_writers, untie_embeddings
from ..registry import MODES
from ..sites import check_layers, n_layers
from .base import Intervention
from .cumulative import EMBED, cumulative_spans

__all__ = ["UpdateBlock", "CumulativeUpdateBlock", "residual_write_params", "writer_layer"]


def residual_write_params(
    model: Any, layers: Sequence[int] | None = None
) -> list[tuple[str, int, torch.nn.Parameter, int]]:
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
            labels = ["embed", "pos_embed", *labels]
        for label in labels:
            inner = _writer_module(model, label, _UNSUPPORTED)
            if inner is None:
                continue
            for pname in ("weight", "bias"):
                p = getattr(inner, pname, None)
                if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                    out.append((f"{label}.{pname}", layer, p, _axis(inner, p, D, label, "; use mode='grad'")))
    return out


_UNSUPPORTED = (
    "the update block supports TransformerLens 4 bridges (blocks.{l}.attn.o, blocks.{l}.mlp.out, embed, "
    "pos_embed). Use mode='grad' instead."
)


class _PinnedWriters(Intervention):
    """What both update blocks share: ``params`` rows ``(label, layer, parameter, d_model axis)``, each with a
    component (:meth:`_component` along :meth:`_basis`) pinned at attach and restored after every optimizer
    step (:meth:`after_step`, called by the loop or, with ``optimizer``, as its step post-hook)."""

    state_name: ClassVar[str]  # for the error of a state from another run
    params: list[tuple[str, int, torch.nn.Parameter, int]]
    optimizer: torch.optim.Optimizer | None
    _pinned: list[Tensor]
    _opt_handle: Any

    def _basis(self, layer: int, p: Tensor) -> Tensor:
        """The pinned vector (or orthonormal rows) of a writer of ``layer``, on ``p``'s device and dtype."""
        raise NotImplementedError

    @staticmethod
    def _component(p: Tensor, basis: Tensor, axis: int) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _subtract(p: Tensor, basis: Tensor, excess: Tensor, axis: int) -> None:
        """Remove ``excess`` (the component's change) from ``p``, in place."""
        raise NotImplementedError

    def _on_attach(self) -> None:
        with torch.no_grad():
            self._pinned = [self._component(p, self._basis(j, p), axis).clone() for _, j, p, axis in self.params]
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
        for (_, j, p, axis), c in zip(self.params, self._pinned):
            basis = self._basis(j, p)
            self._subtract(p, basis, self._component(p, basis, axis) - c, axis)

    def state_dict(self) -> dict[str, Tensor]:
        return {label: c for (label, *_), c in zip(self.params, self._pinned)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        labels = [label for label, *_ in self.params]
        if sorted(state) != sorted(labels):
            raise ConfigError(
                f"{self.state_name} state holds {sorted(state)}, expected {sorted(labels)}; it is from another run."
            )
        self._pinned = [state[label].to(p) for label, _, p, _ in self.params]


class UpdateBlock(_PinnedWriters):
    """``update``: keep ``v^T W`` of residual-writing weights fixed across optimizer steps."""

    mode = "update"
    state_name = "update-block"

    def __init__(
        self,
        model: Any,
        direction: Direction,
        layers: Sequence[int] | int | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        super().__init__(model, direction, layers)
        self.params = residual_write_params(model, self.layers)
        self.optimizer = optimizer
        self._pinned, self._opt_handle = [], None

    def _basis(self, layer: int, p: Tensor) -> Tensor:
        return self.direction[layer].to(p)

    @staticmethod
    def _component(p: Tensor, v: Tensor, axis: int) -> Tensor:
        return torch.tensordot(v, p, dims=([0], [0])) if axis == 0 else p @ v

    @staticmethod
    def _subtract(p: Tensor, v: Tensor, excess: Tensor, axis: int) -> None:
        if axis == 0:
            p.sub_(v.reshape(-1, *([1] * (p.ndim - 1))) * excess)
        else:
            p.sub_(excess[:, None] * v)


MODES.register(
    "update",
    UpdateBlock,
    needs=(),
    color="#000000",
    doc="keep v^T W of every residual-writing weight fixed across optimizer steps",
)


def writer_layer(label: str) -> int:
    """The layer of a residual writer's label: ``EMBED`` (-1) for the embeddings, else ``l`` of ``blocks.{l}``."""
    if label.startswith(("embed.", "pos_embed.")):
        return EMBED
    return int(label.split(".")[1])


class CumulativeUpdateBlock(_PinnedWriters):
    """``update-cum``: keep ``U_j^T W`` of every residual writer of layer ``j`` fixed across optimizer steps.

    Args:
        model: a TransformerLens 4 bridge.
        direction: a :class:`Direction` or a :class:`Subspace` (all its rows are pinned).
        layers: the blocked layers (``None``: all the direction's layers).
        optimizer: for loops that do not call ``after_step``: the projection runs as its step post-hook.
        tied: ``"keep"`` (default: pin the shared embedding/unembedding matrix) or ``"untie"`` (see the module docs).
        shared: one span (every blocked layer's rows) at every writer of every layer.
    """

    mode = "update-cum"
    state_name = "update-cum"

    def __init__(self, model: Any, direction: Direction | Subspace, layers: Sequence[int] | int | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, tied: str = "keep", shared: bool = False):  # fmt: skip
        sub = as_subspace(direction)
        super().__init__(model, sub.direction, layers)
        if tied not in ("keep", "untie"):
            raise ConfigError(f"tied={tied!r}; use 'keep' (pin the shared matrix) or 'untie' (untie first).")
        if tied == "untie" and optimizer is not None and embeddings_tied(model):
            raise ConfigError(
                "tied='untie' creates a new unembedding parameter at attach, which the optimizer you passed does not "
                "hold; build the optimizer after attaching (finetune does), or use tied='keep'."
            )
        self.subspace = sub.select(list(self.layers))
        self.shared, self.tied, self.optimizer = bool(shared), tied, optimizer
        self.spans = cumulative_spans(self.subspace, n_layers(model), self.shared)
        self.lora = bool(lora_layers(model))
        if self.lora:  # the writes are W x + s B A x with W frozen: pin U_j^T B of the writers' adapters
            others = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
            if others:
                raise ConfigError(
                    f"update-cum with LoRA adapters pins the residual-writing adapters' B matrices; the other trainable "
                    f"parameters {others[:4]}{'...' if len(others) > 4 else ''} are not covered: freeze them (apply_lora "
                    "does) or merge the adapters first (reversion_lens.lora.merge_lora)."
                )
            writers = [w.astuple() for w in lora_residual_writers(model)]
        else:
            writers = [(w.label, writer_layer(w.label), w.parameter, w.axis) for w in residual_writers(model)]
        self.params = [w for w in writers if w[1] in self.spans]
        self._pinned, self._opt_handle = [], None

    def _on_attach(self) -> None:
        if self.tied == "untie":
            untie_embeddings(self.model)
        super()._on_attach()

    def _basis(self, layer: int, p: Tensor) -> Tensor:
        return self.spans[layer].to(p)

    @staticmethod
    def _component(p: Tensor, q: Tensor, axis: int) -> Tensor:
        """``Q W`` along ``axis`` (the d_model axis): ``[r, ...]`` for axis 0, ``[..., r]`` for axis 1."""
        return torch.tensordot(q, p, dims=([1], [0])) if axis == 0 else p @ q.T

    @staticmethod
    def _subtract(p: Tensor, q: Tensor, excess: Tensor, axis: int) -> None:
        if axis == 0:
            p.sub_(torch.tensordot(q, excess, dims=([0], [0])))
        else:
            p.sub_(excess @ q)

    def _options(self) -> dict[str, Any]:
        return {"shared": self.shared, "tied": self.tied, "k": self.subspace.k, "writers": len(self.params),
                "span_dims": {str(j): int(b.shape[0]) for j, b in self.spans.items()}}  # fmt: skip


MODES.register(
    "update-cum",
    CumulativeUpdateBlock,
    needs=(),
    subspace=True,
    color="#6A3D9A",
    doc="keep U_j^T W of every residual writer fixed, U_j = v_rev of each blocked layer >= j (AdamW: exact)",
)
