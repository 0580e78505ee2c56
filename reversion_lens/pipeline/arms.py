"""The arm grammar: one experimental condition per name, the same in every setting.

=========================  ==============================================================================
``none``                   fine-tune on the setting's benign data, no intervention
``<mode>:<direction>``     the same data with an intervention: ``mode`` any registered mode
                           (:data:`reversion_lens.registry.MODES`: ``grad``, ``clamp``, ``ablate``,
                           ``update``, ``penalty-block``, ``penalty-push``, ...), ``direction``
                           ``v_rev`` (the seed's reversion direction) or ``random`` (a seeded random
                           direction with the same layers and norms: the control)
``control:rehearsal``      no intervention, but fine-tune on the benign data with the alignment data mixed
                           back in (the negative control: it keeps refusing). ``control:aligned-mix`` is
                           the toy world's older name for it and still works
``...@<layers>``           a suffix on an intervention arm: block only these layers, e.g. ``grad:v_rev@1``
                           or ``grad:v_rev@0,2`` (a per-layer ablation is one arm per layer)
``<mode>:v_rev<k>``        a ``k``-dimensional v_rev per layer (the mean difference plus the top ``k - 1``
                           principal components of the per-prompt displacements orthogonal to it,
                           :func:`reversion_lens.directions.reversion_subspace`), e.g. ``grad-cum:v_rev4``;
                           ``random<k>`` is its control. Only modes registered with ``subspace=True``
                           (``grad-cum``, ``grad-shared``, ``update-cum``) take ``k > 1``
=========================  ==============================================================================
"""

import re
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import MODES

__all__ = ["Arm", "DIRECTIONS", "DATA", "DATA_ALIASES"]

DIRECTIONS = ("v_rev", "random")
_DIRECTION = re.compile(r"^(v_rev|random)([1-9][0-9]*)?$")  # [BLOCKS] v_rev<k> / random<k>: a k-dim subspace
#: The fine-tuning data an arm can ask a setting for.
DATA = ("benign", "rehearsal")
DATA_ALIASES = {"aligned-mix": "rehearsal"}


@dataclass(frozen=True)
class Arm:
    """One experimental condition, parsed from its name (see the module docstring)."""

    name: str
    mode: str | None = None
    direction: str | None = None
    data: str = "benign"
    layers: tuple[int, ...] | None = None
    k: int = 1  # the direction's dimension per layer (v_rev<k>, random<k>)

    @property
    def is_control(self) -> bool:
        """A data control (``control:...``): no intervention, other fine-tuning data."""
        return self.mode is None and self.data != "benign"

    @classmethod
    def parse(cls, name: str) -> "Arm":
        if not isinstance(name, str):
            raise ConfigError(f"arm {name!r} is not a string; write arms as 'none', 'grad:v_rev', 'control:rehearsal'.")
        base, at, layer_part = name.partition("@")
        layers = None
        if at:
            try:
                layers = tuple(int(x) for x in layer_part.split(","))
            except ValueError:
                raise ConfigError(f"arm {name!r}: layers after '@' must be integers, e.g. 'grad:v_rev@0,2'.") from None
        if base == "none":
            if layers is not None:
                raise ConfigError(f"arm {name!r}: 'none' blocks nothing, so it takes no '@<layers>'.")
            return cls(name)
        head, _, tail = base.partition(":")
        if head == "control":
            data = DATA_ALIASES.get(tail, tail)
            if data != "rehearsal" or layers is not None:
                raise ConfigError(f"arm {name!r}: the data control is 'control:rehearsal' (or 'control:aligned-mix').")
            return cls(name, data=data)
        match = _DIRECTION.match(tail)
        if head not in MODES or match is None:
            raise ConfigError(
                f"unknown arm {name!r}; use 'none', 'control:rehearsal' or '<mode>:<direction>' with mode one of "
                f"{', '.join(MODES.names())} and direction one of {', '.join(DIRECTIONS)} (or v_rev<k> / random<k> "
                "for a k-dimensional subspace), optionally '@<layers>'."
            )
        k = int(match.group(2) or 1)
        if k > 1 and not MODES[head].meta.get("subspace"):
            takes = [e.name for e in MODES if e.meta.get("subspace")]
            raise ConfigError(f"arm {name!r}: mode {head!r} blocks one vector per layer; a {k}-dimensional v_rev needs "
                              f"a subspace mode ({', '.join(takes)}).")  # fmt: skip
        return cls(name, mode=head, direction=match.group(1), layers=layers, k=k)
