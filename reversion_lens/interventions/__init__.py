"""Interventions: block (or push) motion along a direction, per layer, and remove exactly what was added.

Every mode is a class built by :func:`block` (``block(model, v, mode="grad", layers=None, **opts)``).
It is a context manager (``with block(model, v): ...``) and a handle for notebooks
(``h = block(model, v).attach(); ...; h.remove()``). Hooks are registered one at a time, each handle
kept as it is added; on exit, on an exception in the body or on a failure half-way through
registration, exactly those handles are removed and nothing else. ``layers`` is any subset of the
direction's layers (all by default), so a per-layer ablation is one loop. The random-direction
control of any call is the same call with :func:`random_control` (``v`` replaced by a seeded random
direction with the same layers, site and norms).

What each mode guarantees, and what it does not (each module's docstring says it in full; ``W_j`` are the
residual-writing weights of layer ``j``: ``attn.o``, ``mlp.out``, the embeddings for ``j = -1``):

====================  =========================================================  =================================
mode                  guarantee (to float rounding)                              not guaranteed
====================  =========================================================  =================================
``grad``              ``v_l^T dL/dW_l = 0`` for layer ``l``'s own writers; no    earlier layers' writes along
                      ``v_l`` in the trunk gradient at ``l``'s sites             ``v_l``; AdamW updates; reads
``grad-cum``          ``u^T dL/dW_j = 0`` for every ``u`` of every blocked       AdamW updates; tied embeddings;
                      layer ``l >= j``: resid_l moves along ``v_l`` only         the reads (they still move
                      through changed reads (SGD)                                along v_rev)
``grad-shared``       as ``grad-cum`` with one span at every writer              as ``grad-cum``
``grad-cum-exact``    both ``grad-cum``'s and ``update-cum``'s                   the reads' own updates
``grad-everywhere``   one vector ``r`` (mean v_rev): ``r^T dL/dW = 0`` at every  each layer's own ``v_l``; AdamW
                      writer, no ``r`` in the trunk gradient                     updates; reads
``update``            ``v_l^T W_l`` fixed for layer ``l``'s own writers, any     earlier layers' writers; LoRA
                      optimizer                                                  adapters (frozen base weights)
``update-cum``        ``U_j^T W_j`` fixed for every writer (embeddings tied or   the reads: activations still
                      not), ``U_j`` = v_rev of every blocked layer ``>= j``,     move along v_rev through them
                      under AdamW with weight decay
``clamp``             ``h_l.v_l`` = the frozen reference's, every layer and      the bare weights (remove it and
                      position, while attached                                   the drift is there)
``orthogonalize``     right after the edit ``h.r = 0`` at every site (no layer   anything after the first step;
                      writes or carries ``r``)                                   it erases the refusal signal
``ablate``            ``h.v = 0`` at the hooked sites (inference)                later layers may write v back
``penalty-*``         nothing (a soft auxiliary loss)
====================  =========================================================  =================================

Modes are registered in :data:`reversion_lens.registry.MODES` (one module each in this package:
``grad``, ``clamp``, ``ablate``, ``penalty``, ``update``, ``cumulative`` (``grad-cum``, ``grad-shared``),
``everywhere`` (``grad-everywhere``), ``exact`` (``grad-cum-exact``), ``orthogonal`` (``orthogonalize``);
``update-cum`` lives in ``update``);
each module's docstring states what the mode
guarantees and what it does not. A new mode is one file here (a subclass of :class:`Intervention`
registered with ``MODES.register(name, cls, needs=..., color=...)``) and one test.
"""

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

from ..directions import Direction, random_direction
from ..errors import ConfigError
from ..hooks import active_interventions, paused
from ..registry import MODES
from .ablate import Ablate
from .base import Intervention, project_out
from .clamp import Clamp
from .cumulative import CumulativeGradBlock
from .everywhere import GradEverywhere
from .exact import ExactCumulativeBlock
from .grad import GradBlock
from .orthogonal import Orthogonalize
from .penalty import Penalty
from .update import CumulativeUpdateBlock, UpdateBlock, residual_write_params

__all__ = [
    "Intervention",
    "GradBlock",
    "Clamp",
    "Ablate",
    "Penalty",
    "UpdateBlock",
    "CumulativeGradBlock",
    "CumulativeUpdateBlock",
    "GradEverywhere",
    "ExactCumulativeBlock",
    "Orthogonalize",
    "MODES",
    "block",
    "random_control",
    "active_interventions",
    "paused",
    "project_out",
    "residual_write_params",
]


def block(
    model: Any, direction: Direction, mode: str = "grad", layers: Sequence[int] | int | None = None, **opts: Any
) -> Intervention:
    """Build an intervention (not yet attached): ``with block(model, v): ...`` or ``block(...).attach()``.

    Args:
        model: a TransformerLens model.
        direction: per-layer unit vectors (``Direction``); its ``site`` is where forward modes act.
        mode: a registered mode (:data:`~reversion_lens.registry.MODES`): ``"grad"`` (default), ``"clamp"``,
            ``"ablate"``, ``"penalty"`` (``"penalty-block"``, ``"penalty-push"``) or ``"update"``.
        layers: any subset of ``direction.layers`` (``None``: all of them).
        **opts: ``clamp``: ``reference_model`` (per input) or ``reference`` (mean); ``ablate``: ``sites``;
            ``penalty``: ``probes``, ``reference``, ``base``, ``weight``, ``sign``, ``batch_size``;
            ``update``: ``optimizer``.
    """
    entry = MODES[mode]  # an unknown mode is a ConfigError listing the registered ones
    cls, opts = entry.obj, {**entry.meta.get("options", {}), **opts}
    try:
        inspect.signature(cls).bind(model, direction, layers, **opts)
    except TypeError as e:
        raise ConfigError(f"bad options for mode {mode!r}: {e}. See reversion_lens.interventions.block.") from None
    return cls(model, direction, layers, **opts)


def random_control(direction: Direction, seed: int = 0) -> Direction:
    """The random-direction control of ``direction``: same layers, site and norms, seeded isotropic vectors."""
    ctrl = random_direction(direction.d_model, direction.layers, seed, site=direction.site, like=direction)
    return dataclasses.replace(ctrl, provenance={**ctrl.provenance, "control_of": direction.provenance.get("method")})
