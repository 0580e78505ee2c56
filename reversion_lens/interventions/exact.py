"""``grad-cum-exact``: ``grad-cum`` and ``update-cum`` together. The backward hooks of ``grad-cum`` project the
span ``U_j`` (v_rev of every blocked layer ``>= j``) out of the gradient at every residual write of layer ``j``,
so every weight upstream of a write (its reads: LayerNorm, Q/K/V, MLP input, and earlier layers) is trained on
the projected gradient; after each optimizer step the pins of ``update-cum`` reset ``U_j^T W`` of every writer
(embeddings, tied or not, included) to its value at attach, which the projected gradient alone does not do
under Adam/AdamW or weight decay. Guarantees: both modes' guarantees (the writers' gradients and their realised
updates have no ``U_j`` component, under any optimizer). Against ``grad-cum`` it isolates one possible cause of
a failing block, "under AdamW a projected gradient is not a projected update"; against ``update-cum``, the
effect of the projected gradient on the reads. Does not guarantee: the reads' own updates (they still move the
activations along v_rev, to second order and through AdamW's rescaling), dropout, anything once detached.
"""

from ..registry import MODES
from .cumulative import CumulativeGradBlock
from .update import CumulativeUpdateBlock

__all__ = ["ExactCumulativeBlock"]


class ExactCumulativeBlock(CumulativeUpdateBlock):
    """``grad-cum-exact``: the projected gradient of ``grad-cum`` plus the exact writer pins of ``update-cum``.

    Takes ``update-cum``'s arguments (``optimizer``, ``tied``, ``shared``); the hooks are ``grad-cum``'s.
    """

    mode = "grad-cum-exact"
    _hook_specs = CumulativeGradBlock._hook_specs


MODES.register(
    "grad-cum-exact",
    ExactCumulativeBlock,
    needs=(),
    subspace=True,
    color="#332288",
    doc="grad-cum's projected gradient and update-cum's exact writer pins together",
)
