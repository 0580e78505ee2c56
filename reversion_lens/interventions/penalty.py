"""``penalty``: no hooks; :meth:`Penalty.extra_loss` runs the probe prompts, reads the probe activations
at the direction's site, takes each layer's mean projection onto ``v`` relative to the reference,
``r_l = (mean_l.v_l - c_l) / s_l`` (``s_l = ||mean_base - mean_ref||`` when ``base`` is given, so
``r`` is the reversion ratio; else 1), and returns ``weight * mean_l relu(r_l)^2`` for
``sign="block"`` (motion toward ``v`` is penalised, motion away is free) or ``-weight * mean_l r_l``
for ``sign="push"`` (motion toward ``v`` is rewarded). It only acts through a training loop that adds
it to the loss (:func:`reversion_lens.training.finetune` does). Soft: nothing is guaranteed.
"""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..directions import Direction
from ..errors import ConfigError, ShapeError
from ..hooks import EarlyStop
from ..probes import ProbeSet
from ..registry import MODES
from ..sites import hook_name
from .base import Intervention, _components, _reference_rows

__all__ = ["Penalty"]


class Penalty(Intervention):
    """``penalty``: an auxiliary loss on the probe activations' projection onto ``v`` (see module docs)."""

    mode = "penalty"

    def __init__(
        self,
        model: Any,
        direction: Direction,
        layers: Sequence[int] | int | None = None,
        *,
        probes: ProbeSet,
        reference: Any,
        base: Any = None,
        weight: float = 1.0,
        sign: str = "block",
        batch_size: int | None = None,
    ):
        super().__init__(model, direction, layers)
        if sign not in ("block", "push"):
            raise ConfigError(f"sign must be 'block' (penalise motion toward v) or 'push' (reward it), not {sign!r}.")
        probes.check_vocab(int(model.cfg.d_vocab))
        site = self.direction.site
        self.probes, self.weight, self.sign = probes, float(weight), sign
        ref_rows = _reference_rows(reference, direction, self.layers, site)
        self.reference = _components(ref_rows, self.direction)
        self.scale = torch.ones(len(self.layers), dtype=torch.float64)
        if base is not None:
            base_rows = _reference_rows(base, direction, self.layers, site)
            if base_rows.ndim == 2 and ref_rows.ndim == 2:  # ||mean_base - mean_ref||, as drift_metrics
                self.scale = (base_rows - ref_rows).norm(dim=1)
            else:
                self.scale = (_components(base_rows, self.direction) - self.reference).abs()
            if (self.scale < 1e-12).any():
                raise ShapeError("base and reference coincide at some layer; no reversion scale is defined there.")
        # In probe-set order: step k's penalty batch is a fixed, length-mixed slice of the probes, as it always was.
        self._batches = list(probes.batches(batch_size or len(probes), by_length=False))

    def projections(self, model: Any, step: int = 0) -> Float[Tensor, " layer"]:
        """Per-layer ``r_l`` on probe batch ``step % n_batches`` (differentiable)."""
        batch = self._batches[step % len(self._batches)]
        names = {hook_name(model, self.direction.site, layer): i for i, layer in enumerate(self.layers)}
        canon = {getattr(model.hook_dict[n], "name", n) or n: i for n, i in names.items()}
        last = max(canon.values())
        device = next(model.parameters()).device
        w = batch.weights.to(device)
        got: dict[int, Tensor] = {}
        early = EarlyStop()

        def read(x: Tensor, hook: Any) -> None:
            i = canon.get(hook.name, names.get(hook.name))
            got[i] = torch.einsum("bpd,bp->bd", x, w.to(x.dtype)).mean(0)
            if i == last:
                early.stop()

        with model.hooks(fwd_hooks=[(n, read) for n in names]):
            early.run(model, batch.tokens.to(device), attention_mask=batch.attention_mask.to(device))
        means = torch.stack([got[i] for i in range(len(self.layers))])
        v = self.direction.vectors.to(means.device, means.dtype)
        ref = self.reference.to(means.device, means.dtype)
        return ((means * v).sum(1) - ref) / self.scale.to(means.device, means.dtype)

    def extra_loss(self, model: Any, step: int) -> Tensor | None:
        if self._paused:
            return None
        r = self.projections(model, step)
        if self.sign == "block":
            return self.weight * torch.relu(r).pow(2).mean()
        return -self.weight * r.mean()

    def _options(self) -> dict[str, Any]:
        return {"weight": self.weight, "sign": self.sign, "probes": self.probes.hash(), "n_batches": len(self._batches)}


_NEEDS = ("probes", "reference", "base", "weight")
MODES.register(
    "penalty",
    Penalty,
    needs=_NEEDS,
    color="#56B4E9",
    doc="auxiliary loss on the probe means' projection (sign= block | push)",
)
MODES.register(
    "penalty-block",
    Penalty,
    needs=_NEEDS,
    options={"sign": "block"},
    color="#56B4E9",
    doc="penalise motion of the probe means toward v",
)
MODES.register(
    "penalty-push",
    Penalty,
    needs=_NEEDS,
    options={"sign": "push"},
    color="#CC79A7",
    doc="reward motion of the probe means toward v",
)
