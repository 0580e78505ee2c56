"""``grad`` (default): a backward hook at each residual write of each blocked layer (``resid_pre``,
``attn_out``, ``resid_post``: :func:`reversion_lens.sites.residual_write_hooks`) replaces the
gradient ``g`` by ``g - (g.v) v``: one hook per hook point; where sites of several layers fall on one
point, one hook projects out the span of their vectors. Guarantees: the gradient leaving every blocked
site has no ``v`` component, so the gradients of the weights that write there directly (attention
output and MLP output weights and biases of the layer; token and position embeddings when layer 0 is
blocked) have ``v^T dL/dW = 0`` along the ``d_model`` axis (to float rounding). Backward hooks bind at
*forward* time: run the forward pass inside the context. Does not guarantee: that the weights'
*updates* stay orthogonal under Adam/AdamW (per-element scaling rotates them: 8e-2 after 20 steps,
TL4_GUIDE section 3; use ``update``) or under SGD weight decay; orthogonality with **dropout** in
train mode (the mask acts between hook and weight: 1e-2 to 4e-2 on GPT-2) or with **tied embeddings**
(the unembedding's gradient reaches the shared matrix unprojected: 5e-2 on GPT-2); and it is a
first-order statement: the activations' ``v`` component still moves, because weights upstream of
and inside the blocked layer (LayerNorm, Q/K/V, MLP input) change what the writing weights receive.
"""

from collections.abc import Callable

from ..registry import MODES
from ..sites import residual_write_hooks
from .base import Intervention, _grouped_projections

__all__ = ["GradBlock"]


class GradBlock(Intervention):
    """``grad``: project ``v`` out of the gradient at every residual write of each blocked layer."""

    mode = "grad"

    def _hook_specs(self) -> list[tuple[str, str, Callable]]:
        names = {layer: residual_write_hooks(self.model, layer) for layer in self.layers}
        return [
            (name, "bwd", self._grad_hook(basis))
            for name, basis in _grouped_projections(self.model, names, self.direction)
        ]


MODES.register(
    "grad",
    GradBlock,
    needs=(),
    color="#0072B2",
    doc="project v out of the residual gradient at every write of each blocked layer",
)
