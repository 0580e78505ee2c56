"""Drift metrics: how far, and which way, a model state has moved from a reference (the aligned model).

Per layer ``l``, with ``drift = mean_t - mean_ref``:

* ``cos``: cosine(drift, v_rev) (0 when the drift is exactly zero);
* ``projection``: ``drift . v_rev`` (v_rev is unit), in activation units;
* ``drift_norm``: ``||drift||``;
* ``reversion_ratio``: ``projection / ||mean_base - mean_ref||``: the fraction of the base-to-reference
  displacement undone (1 = back at the base along v_rev, 0 = no motion, < 0 = further away).
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import ResidStats
from .directions import Direction
from .errors import NonFiniteError, ShapeError

__all__ = ["drift_metrics", "METRIC_COLUMNS"]

METRIC_COLUMNS = ("cos", "projection", "drift_norm", "reversion_ratio")


def _means(x: ResidStats | Tensor, layers: tuple[int, ...], what: str) -> Float[Tensor, "layer d_model"]:
    if isinstance(x, ResidStats):
        if x.layers != layers:
            x_idx = [x.layer_index(layer) for layer in layers]
            return x.mean[x_idx].double()
        return x.mean.double()
    t = torch.as_tensor(x).double()
    if t.ndim != 2 or t.shape[0] != len(layers):
        raise ShapeError(f"{what} has shape {tuple(t.shape)}, expected [{len(layers)}, d_model] for layers {layers}.")
    return t


def drift_metrics(
    current: ResidStats | Tensor,
    reference: ResidStats | Tensor,
    base: ResidStats | Tensor,
    direction: Direction,
    **labels: Any,
) -> list[dict[str, Any]]:
    """Tidy records, one per layer of ``direction``: ``{**labels, layer, cos, projection, drift_norm, reversion_ratio}``.

    Tensors given instead of :class:`ResidStats` must be ``[layer, d_model]`` for ``direction.layers``.
    Wrap in ``pandas.DataFrame(...)`` for a table.
    """
    layers = direction.layers
    cur = _means(current, layers, "current")
    ref = _means(reference, layers, "reference")
    bas = _means(base, layers, "base")
    if not (cur.shape == ref.shape == bas.shape) or cur.shape[1] != direction.d_model:
        raise ShapeError(
            f"shapes differ: current {tuple(cur.shape)}, reference {tuple(ref.shape)}, base {tuple(bas.shape)}, "
            f"direction d_model {direction.d_model}. The direction, reference and base must come from the same "
            "model (same d_model) as the activations measured: measure the model the direction was derived for."
        )
    if not torch.isfinite(cur).all():
        bad = [layers[i] for i in (~torch.isfinite(cur)).any(1).nonzero().flatten().tolist()]
        raise NonFiniteError(
            f"current means are non-finite at layer(s) {bad}; the run diverged. Lower the learning rate "
            "(nothing was recorded for this measurement)."
        )
    v = direction.vectors.double().cpu()
    drift = cur - ref
    proj = (drift * v).sum(1)
    norm = drift.norm(dim=1)
    cos = torch.where(norm > 0, proj / norm.clamp_min(1e-300), torch.zeros_like(proj))
    dist = (bas - ref).norm(dim=1)
    ratio = torch.where(dist > 0, proj / dist.clamp_min(1e-300), torch.full_like(proj, float("nan")))
    return [
        {
            **labels,
            "layer": layer,
            "cos": float(cos[i]),
            "projection": float(proj[i]),
            "drift_norm": float(norm[i]),
            "reversion_ratio": float(ratio[i]),
        }
        for i, layer in enumerate(layers)
    ]
