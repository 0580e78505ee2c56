"""``ablate``: forward projection ``h - (h.v) v`` at the direction's site (``sites=`` for more), for
inference. Guarantees ``h.v = 0`` at those points; later layers may write ``v`` back.
"""

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from ..directions import Direction
from ..hooks import Cast
from ..registry import MODES
from ..sites import hook_name
from .base import Intervention, _check_forward_site, _grouped_projections, project_out

__all__ = ["Ablate"]


class Ablate(Intervention):
    """``ablate``: forward projection ``h - (h.v) v`` at the direction's site (or ``sites``)."""

    mode = "ablate"

    def __init__(
        self,
        model: Any,
        direction: Direction,
        layers: Sequence[int] | int | None = None,
        *,
        sites: Sequence[str] | None = None,
    ):
        super().__init__(model, direction, layers)
        self.sites = tuple(sites) if sites is not None else (direction.site,)
        for site in self.sites:
            _check_forward_site(model, site)

    def _hook_specs(self) -> list[tuple[str, str, Callable]]:
        names = {layer: [hook_name(self.model, site, layer) for site in self.sites] for layer in self.layers}
        return [
            (name, "fwd", self._make_hook(basis))
            for name, basis in _grouped_projections(self.model, names, self.direction)
        ]

    def _make_hook(self, basis: Tensor) -> Callable:
        q = Cast(basis)

        def project_act(x: Tensor, hook: Any) -> Tensor | None:
            if self._paused:
                return None
            return project_out(x, q.like(x))

        return project_act

    def _options(self) -> dict[str, Any]:
        return {"sites": list(self.sites)}


MODES.register(
    "ablate", Ablate, needs=(), color="#882255", doc="forward projection of v out of the activations (inference)"
)
