"""Drift metrics: how far, and which way, a model state has moved from a reference (the aligned model).

Per layer ``l``, with ``drift = mean_t - mean_ref``:

* ``cos``: cosine(drift, v_rev) (0 when the drift is exactly zero);
* ``projection``: ``drift . v_rev`` (v_rev is unit), in activation units;
* ``drift_norm``: ``||drift||``;
* ``reversion_ratio``: ``projection / ||mean_base - mean_ref||``: the fraction of the base-to-reference
  displacement undone (1 = back at the base along v_rev, 0 = no motion, < 0 = further away).

For a ``k``-dimensional v_rev (:class:`~reversion_lens.directions.Subspace`), :func:`subspace_metrics` gives
per layer the *subspace alignment* ``||P_S drift|| / ||drift||`` (in [0, 1]; for ``k = 1`` it is ``|cos|``)
and its isotropic null: for a drift uniform on the sphere, the squared alignment is
``Beta(k/2, (d-k)/2)`` (mean ``k/d``), so its p99 is :func:`subspace_null_quantile`.
"""

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import ResidStats
from .directions import Direction, Subspace, as_subspace
from .errors import NonFiniteError, ShapeError

__all__ = [
    "drift_metrics",
    "METRIC_COLUMNS",
    "subspace_alignment",
    "subspace_null_quantile",
    "subspace_metrics",
    "SUBSPACE_COLUMNS",
]

METRIC_COLUMNS = ("cos", "projection", "drift_norm", "reversion_ratio")
SUBSPACE_COLUMNS = ("k", "alignment", "energy_share", "null_p99", "lead_cos", "drift_norm")


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


def subspace_alignment(
    drift: Float[Tensor, "layer d_model"], basis: Float[Tensor, "layer k d_model"]
) -> Float[Tensor, " layer"]:
    """``||P_S d|| / ||d||`` per layer for orthonormal rows ``basis[l]`` (0 where the drift is exactly zero)."""
    d = torch.as_tensor(drift).double()
    q = torch.as_tensor(basis).double().to(d.device)
    if d.ndim != 2 or q.ndim != 3 or q.shape[0] != d.shape[0] or q.shape[2] != d.shape[1]:
        raise ShapeError(f"drift {tuple(d.shape)} and basis {tuple(q.shape)} must be [layer, d] and [layer, k, d].")
    inside = torch.einsum("lkd,ld->lk", q, d).norm(dim=1)
    norm = d.norm(dim=1)
    return torch.where(norm > 0, inside / norm.clamp_min(1e-300), torch.zeros_like(norm))


def subspace_null_quantile(q: float, d: int, k: int) -> float:
    """The ``q``-quantile of ``||P_S u||`` for ``u`` uniform on the unit sphere in ``d`` dimensions and a fixed
    ``k``-dimensional ``S``: ``sqrt`` of the ``Beta(k/2, (d-k)/2)`` quantile (the squared alignment's law)."""
    import scipy.stats

    if not 1 <= k < d:
        raise ShapeError(f"need 1 <= k < d for the subspace null, got k={k}, d={d}.")
    if not 0 <= q <= 1:
        raise ValueError(f"quantile level q must lie in [0, 1], got {q}.")
    return float(scipy.stats.beta.ppf(q, k / 2, (d - k) / 2) ** 0.5)


def subspace_metrics(
    current: ResidStats | Tensor,
    reference: ResidStats | Tensor,
    subspace: Subspace | Direction,
    q: float = 0.99,
    **labels: Any,
) -> list[dict[str, Any]]:
    """Tidy records per layer: ``{**labels, layer, k, alignment, energy_share, null_p99, lead_cos, drift_norm}``.

    ``alignment`` = ``||P_S drift|| / ||drift||``, ``energy_share`` its square (the share of the drift's
    squared norm inside ``S``; isotropic mean ``k / d``), ``null_p99`` the isotropic ``q``-quantile of the
    alignment, ``lead_cos`` the signed cosine with the leading row (v_rev itself for a reversion subspace).
    """
    sub = as_subspace(subspace)
    layers = sub.layers
    cur = _means(current, layers, "current")
    ref = _means(reference, layers, "reference")
    if cur.shape != ref.shape or cur.shape[1] != sub.d_model:
        raise ShapeError(f"current {tuple(cur.shape)}, reference {tuple(ref.shape)} and the subspace's d_model "
                         f"{sub.d_model} do not match; measure the model the subspace was derived for.")  # fmt: skip
    if not torch.isfinite(cur).all():
        raise NonFiniteError("current means are non-finite; the run diverged.")
    drift = cur - ref
    align = subspace_alignment(drift, sub.basis)
    norm = drift.norm(dim=1)
    lead = (drift * sub.vectors.double()).sum(1)
    lead_cos = torch.where(norm > 0, lead / norm.clamp_min(1e-300), torch.zeros_like(norm))
    p99 = subspace_null_quantile(q, sub.d_model, sub.k)
    return [
        {**labels, "layer": layer, "k": sub.k, "alignment": float(align[i]), "energy_share": float(align[i] ** 2),
         "null_p99": p99, "lead_cos": float(lead_cos[i]), "drift_norm": float(norm[i])}
        for i, layer in enumerate(layers)
    ]  # fmt: skip
