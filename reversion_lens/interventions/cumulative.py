"""``grad-cum`` (and ``grad-shared``): backward hooks at every residual *write* (the embeddings' sum at
``resid_pre`` of layer 0, each layer's ``attn_out`` and ``mlp_out``) replace the gradient ``g`` by its
projection off a span: for the writes of layer ``j``, the span ``U_j`` of v_rev at **every blocked layer
l >= j** (the embeddings: every blocked layer); ``grad-shared`` uses one span, of every blocked layer's
v_rev, at every write of every layer. A :class:`~reversion_lens.directions.Subspace` direction (arms
``grad-cum:v_rev4``) contributes all its rows. Guarantees: every weight that writes the residual stream
at or before a blocked layer ``l`` gets ``u^T dL/dW = 0`` along ``d_model`` for every ``u`` in that
layer's subspace (to float rounding), so under SGD without weight decay ``v_l^T W`` of every writer of
layers ``<= l`` stays at its aligned value, and the motion of the residual at layer ``l`` along ``v_l``,
``v_l . (h_l(x; t) - h_l(x; 0)) = sum_{j<=l} v_l^T W_j(0) (a_j(x; t) - a_j(x; 0))``, comes only through
changed *reads* (LayerNorm, Q/K/V, MLP input: what the writers ``W_j`` are fed), never through a changed
writer. The per-layer ``grad`` block guarantees this for layer ``l``'s own writers only: the writes of
earlier layers reach ``h_l`` with their ``v_l`` component free. Does not guarantee: the reads (nothing
here constrains them, so the activations still move along v_rev); the update under Adam/AdamW or weight
decay (use ``update-cum``); the embedding with **tied embeddings** (the unembedding's gradient reaches
the shared matrix unprojected); anything under dropout in train mode. Backward hooks bind at forward
time: run the forward pass inside the context.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..directions import Direction, Subspace, as_subspace
from ..registry import MODES
from ..sites import hook_name, n_layers
from .base import Intervention, _orthonormal

__all__ = ["CumulativeGradBlock", "cumulative_spans", "EMBED"]

#: The writer "layer" of the embeddings (token and position): they write before layer 0.
EMBED = -1


def cumulative_spans(subspace: Subspace, n_layers: int, shared: bool = False) -> dict[int, Tensor]:
    """``{writer layer j: orthonormal rows [r, d_model] (float64)}``: the span of the rows of every layer of
    ``subspace`` that is ``>= j`` (``shared``: of every layer), for ``j`` in ``EMBED, 0, ..., last``.

    ``last`` is the last covered layer (``shared``: ``n_layers - 1``); writers after it get no entry.
    """
    layers = subspace.layers
    last = n_layers - 1 if shared else max(layers)
    out = {}
    for j in range(EMBED, last + 1):
        rows = [subspace[l].double() for l in layers if shared or l >= j]
        if rows:
            out[j] = _orthonormal(torch.cat(rows)).double()
    return out


class CumulativeGradBlock(Intervention):
    """``grad-cum``: project the span of v_rev at every blocked layer ``>= j`` out of the writes of layer ``j``.

    Args:
        model: a TransformerLens model.
        direction: a :class:`Direction` or a :class:`Subspace` (all its rows are blocked).
        layers: the blocked layers (``None``: all the direction's layers).
        shared: block one span (every blocked layer's rows) at every write of every layer (``grad-shared``).
    """

    mode = "grad-cum"

    def __init__(self, model: Any, direction: Direction | Subspace, layers: Sequence[int] | int | None = None, *,
                 shared: bool = False):  # fmt: skip
        sub = as_subspace(direction)
        super().__init__(model, sub.direction, layers)
        self.subspace = sub.select(list(self.layers))
        self.shared = bool(shared)
        self.spans = cumulative_spans(self.subspace, n_layers(model), self.shared)

    def _hook_specs(self) -> list[tuple[str, str, Callable]]:
        specs = [(hook_name(self.model, "resid_pre", 0), "bwd", self._grad_hook(self.spans[EMBED]))]
        for j, basis in self.spans.items():
            if j == EMBED:
                continue
            for site in ("attn_out", "mlp_out"):
                name = f"blocks.{j}.hook_{site}"
                if name in self.model.hook_dict:  # attention-only models have no mlp_out
                    specs.append((hook_name(self.model, site, j), "bwd", self._grad_hook(basis)))
        return specs

    def _options(self) -> dict[str, Any]:
        return {
            "shared": self.shared,
            "k": self.subspace.k,
            "span_dims": {str(j): int(b.shape[0]) for j, b in self.spans.items()},
        }


_DOC = "project v_rev of every blocked layer >= j out of the gradient of layer j's residual writes"
MODES.register("grad-cum", CumulativeGradBlock, needs=(), subspace=True, color="#D55E00", doc=_DOC)
MODES.register(
    "grad-shared",
    CumulativeGradBlock,
    needs=(),
    subspace=True,
    options={"shared": True},
    color="#E69F00",
    doc="project one span (v_rev of every blocked layer) out of the gradient of every residual write",
)
