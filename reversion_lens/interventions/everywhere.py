"""``grad-everywhere``: refusal_direction's "one direction at every site", for the gradient. One unit vector
``r`` is projected out of the gradient at every layer's ``resid_pre`` (block input), ``attn_out`` and
``mlp_out`` (andyrdt/refusal_direction's ablation sites, :data:`reversion_lens.steering.EVERYWHERE_SITES`),
whatever the arm's layers. ``r`` is the normalised mean of the direction's unit vectors over the
selected layers (:func:`shared_vector`): ``grad-everywhere:v_rev`` averages every layer's v_rev,
``grad-everywhere:v_rev@12`` takes layer 12's vector alone (refusal_direction picks one layer's
candidate); so ``@layers`` here selects the vectors, not where the hooks go. Guarantees: the gradient of
every residual-writing weight of every layer (and of the embeddings) has ``r^T dL/dW = 0`` along
``d_model``, and the trunk gradient entering each block has no ``r`` component (to float rounding).
Does not guarantee: anything about each layer's own v_rev (``r`` is one compromise vector: its cosine
with ``v_l`` is in ``describe()``), the update under Adam/AdamW, tied embeddings, dropout; the reads
still change, as for every gradient block.
"""

from collections.abc import Callable, Sequence
from typing import Any

from jaxtyping import Float
from torch import Tensor

from ..directions import Direction, Subspace
from ..errors import ConfigError, DirectionError
from ..registry import MODES
from ..sites import hook_name, n_layers
from ..steering import EVERYWHERE_SITES
from .base import Intervention

__all__ = ["GradEverywhere", "shared_vector"]


def shared_vector(direction: Direction) -> Float[Tensor, " d_model"]:
    """The normalised mean of the direction's unit vectors (its one vector, for a one-layer direction)."""
    v = direction.vectors.double().mean(0)
    norm = v.norm()
    if norm < 1e-6:
        raise DirectionError(
            f"the direction's vectors over layers {list(direction.layers)} cancel out (mean norm {float(norm):.1e}); "
            "pick one layer's vector with '@<layer>'."
        )
    return (v / norm).float()


def _one_vector(direction: Any, mode: str) -> None:
    if isinstance(direction, Subspace) and direction.k > 1:
        raise ConfigError(
            f"mode {mode!r} blocks one vector; for a {direction.k}-dimensional subspace use 'grad-shared' (its span at "
            "every write) or 'grad-cum'."
        )
    if isinstance(direction, Subspace):
        return direction.direction
    return direction


class GradEverywhere(Intervention):
    """``grad-everywhere``: one vector projected out of the gradient at every layer's resid_pre, attn_out, mlp_out."""

    mode = "grad-everywhere"

    def __init__(self, model: Any, direction: Direction, layers: Sequence[int] | int | None = None):
        super().__init__(model, _one_vector(direction, self.mode), layers)
        self.vector = shared_vector(self.direction)

    def _hook_specs(self) -> list[tuple[str, str, Callable]]:
        q = self.vector[None]
        specs = []
        for layer in range(n_layers(self.model)):
            for site in EVERYWHERE_SITES:
                if f"blocks.{layer}.hook_{site}" in self.model.hook_dict:
                    specs.append((hook_name(self.model, site, layer), "bwd", self._grad_hook(q)))
        return specs

    def _options(self) -> dict[str, Any]:
        cos = (self.direction.vectors.double() @ self.vector.double()).tolist()
        return {
            "vector": "normalised mean of the selected layers' vectors",
            "cos_with_layers": cos,
            "hooked": "every layer",
        }


MODES.register(
    "grad-everywhere",
    GradEverywhere,
    needs=(),
    color="#999933",
    doc="one vector (mean v_rev) projected out of the gradient at every resid_pre, attn_out, mlp_out",
)
