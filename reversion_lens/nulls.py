"""Null models of the drift alignment cos(drift, v_rev), one registered function each.

Every null answers: how large would the cosine be, per layer, if the drift had no preferred direction of
the kind the null describes? Each returns the per-layer 99th percentile, and the runner writes it as the
column ``null_p99_<name>`` of ``trajectories.csv`` (results and figures loop over those columns). A null
is a function ``fn(ctx: NullContext) -> list[float]`` registered in :data:`reversion_lens.registry.NULLS`:

``isotropic``
    drift uniform on the sphere in ``d_model`` dimensions: the exact quantile of
    ``(1 + c) / 2 ~ Beta((d-1)/2, (d-1)/2)``. The same for every layer. Weak: real activations are
    anisotropic, so even unrelated drifts align with high-variance directions.
``matched``
    drift ``z ~ N(0, Σ)`` with ``Σ`` the covariance of the aligned model's probe activations at that layer:
    a drift that follows the activations' own anisotropy but has no reason to point along v_rev
    (Monte Carlo, ``ctx.draws`` draws, seeded by the seed).

A third, empirical null is the ``control:rehearsal`` arm (fine-tuning that keeps the alignment data): its
cosines' p99 is computed in aggregation (:mod:`reversion_lens.pipeline.results`), not here.
"""

from dataclasses import dataclass

import torch

from .activations import ResidStats
from .directions import Direction
from .registry import NULLS
from .stats import isotropic_quantile, matched_quantile

__all__ = ["NullContext", "isotropic", "matched", "null_quantiles"]


@dataclass(frozen=True)
class NullContext:
    """What a null may use: v_rev, the aligned model's probe statistics (with second moments), a seed."""

    direction: Direction
    aligned: ResidStats
    seed: int
    draws: int = 20000
    q: float = 0.99


@NULLS.register("isotropic", doc="drift uniform on the sphere (exact Beta quantile)")
def isotropic(ctx: NullContext) -> list[float]:
    return [float(isotropic_quantile(ctx.q, ctx.direction.d_model))] * len(ctx.direction.layers)


@NULLS.register("matched", doc="drift ~ N(0, covariance of the aligned model's probe activations)")
def matched(ctx: NullContext) -> list[float]:
    cov = ctx.aligned.covariance()
    rows = [ctx.aligned.layer_index(layer) for layer in ctx.direction.layers]
    q = matched_quantile(cov[rows], ctx.direction.vectors.double(), q=ctx.q, n=ctx.draws, seed=ctx.seed)
    return [float(x) for x in torch.atleast_1d(q)]


def null_quantiles(ctx: NullContext, names: list[str] | None = None) -> dict[str, list[float]]:
    """``{name: per-layer p99}`` for every registered null (or ``names``), in registry order."""
    chosen = names if names is not None else NULLS.names()
    return {name: NULLS[name].obj(ctx) for name in chosen}
