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
=========================  ==============================================================================
"""

from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import MODES

__all__ = ["Arm", "DIRECTIONS", "DATA", "DATA_ALIASES"]

DIRECTIONS = ("v_rev", "random")
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
        if head not in MODES or tail not in DIRECTIONS:
            raise ConfigError(
                f"unknown arm {name!r}; use 'none', 'control:rehearsal' or '<mode>:<direction>' with mode one of "
                f"{', '.join(MODES.names())} and direction one of {', '.join(DIRECTIONS)}, optionally '@<layers>'."
            )
        return cls(name, mode=head, direction=tail, layers=layers)
