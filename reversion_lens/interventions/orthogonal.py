"""``orthogonalize``: weight orthogonalization *before* fine-tuning, as an arm. When attached, the model is
edited in place by :func:`reversion_lens.orthogonalize.orthogonalize` with one vector ``r`` (the
normalised mean of the selected layers' v_rev, as ``grad-everywhere``: ``@<layer>`` picks one layer's
vector), then fine-tuned with nothing attached. The edit is permanent: :meth:`remove` does not undo it.
Tied embeddings are untied first (``tied="untie"``, the default): the unembedding keeps its own,
unedited copy and becomes a separate trainable parameter, so the arm fine-tunes one ``[vocab, d_model]``
matrix more than the others; ``tied="keep"`` edits the shared matrix, so the unembedding can no longer
read ``r`` either. Guarantees: right after the edit, ``r^T W = 0`` for every residual-writing weight, so
``h.r = 0`` (to float rounding) at every ``resid_pre``, ``resid_post``, ``attn_out`` and ``mlp_out`` of
every position: the model can neither write nor carry ``r``. Does not guarantee: anything after the first
optimizer step (fine-tuning may write ``r`` again; pin it with ``update-cum`` if that is wanted), and it
removes the aligned model's own ``r`` component too, the difference along ``r`` between the aligned and
the base model included: when ``r`` is v_rev that is the refusal signal itself, so the edited model can
be *more* harmful before any fine-tuning (the runner evaluates it at step 0 for that reason).
"""

from collections.abc import Sequence
from typing import Any

from ..directions import Direction
from ..errors import ConfigError
from ..orthogonalize import orthogonalize
from ..registry import MODES
from .base import Intervention
from .everywhere import _one_vector, shared_vector

__all__ = ["Orthogonalize"]


class Orthogonalize(Intervention):
    """``orthogonalize``: a permanent edit at attach (no layer can write ``r``), then nothing."""

    mode = "orthogonalize"
    edits_weights = True  # the runner evaluates step 0 itself: the edited model is not the aligned one

    def __init__(
        self, model: Any, direction: Direction, layers: Sequence[int] | int | None = None, *, tied: str = "untie"
    ):
        super().__init__(model, _one_vector(direction, self.mode), layers)
        if tied not in ("untie", "keep"):
            raise ConfigError(f"tied={tied!r}; use 'untie' (default) or 'keep' (see reversion_lens.orthogonalize).")
        self.tied = tied
        self.vector = shared_vector(self.direction)
        self.edited = False

    def _on_attach(self) -> None:
        orthogonalize(self.model, self.vector, tied=self.tied)
        self.edited = True

    def _options(self) -> dict[str, Any]:
        cos = (self.direction.vectors.double() @ self.vector.double()).tolist()
        return {"tied": self.tied, "cos_with_layers": cos, "permanent": True}


MODES.register(
    "orthogonalize",
    Orthogonalize,
    needs=(),
    color="#AA4499",
    doc="orthogonalize every residual-writing weight against one vector (mean v_rev) before fine-tuning",
)
