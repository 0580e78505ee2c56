"""Contrastive directions on one checkpoint, and choosing the layer where a direction separates best.

The reversion direction compares two *checkpoints* on one probe set. A contrastive direction compares two
*probe sets* on one checkpoint (harmful vs harmless prompts: refusal_direction's difference in means,
steering-vectors' and repeng's positive/negative pairs)::

    v = rl.contrastive.contrastive_direction(model, harmful, harmless, method="mean_difference", site="resid_pre")

is :func:`contrastive_stats` (two :func:`~reversion_lens.residual_stats` passes, per-prompt vectors
kept) followed by an estimator of :data:`reversion_lens.directions.ESTIMATORS` with
``same_probes=False``; the provenance records both probe sets. :func:`rank_layers` (held-out
separation of the two sets) and :func:`rank_layers_by_score` (agreement with a per-prompt label or score)
are pure functions of statistics and return tidy tables.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats as _sps
from torch import Tensor

from .activations import ResidStats, residual_stats
from .directions import ESTIMATORS, Direction
from .errors import ConfigError, ShapeError
from .probes import ProbeSet

__all__ = [
    "contrastive_stats",
    "contrastive_direction",
    "projections",
    "auroc",
    "standardized_mean_difference",
    "rank_layers",
    "rank_layers_by_score",
]


def _estimator(method: str | Callable) -> Callable:
    if callable(method):
        return method
    if method not in ESTIMATORS:
        raise ConfigError(
            f"unknown method {method!r}; choose one of {', '.join(ESTIMATORS.names())} or pass a function."
        )
    return ESTIMATORS[method].obj


def contrastive_stats(
    model: Any,
    positive: ProbeSet,
    negative: ProbeSet,
    *,
    site: str = "resid_post",
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    meta: dict[str, Any] | None = None,
) -> tuple[ResidStats, ResidStats]:
    """Per-prompt statistics of one model on two probe sets (``keep_per_prompt=True``), positive first.

    Each carries ``meta["contrast"]`` (``"positive"`` or ``"negative"``) besides its probe description.
    """
    out = []
    for role, probes in (("positive", positive), ("negative", negative)):
        info = {**(meta or {}), "contrast": role}
        out.append(residual_stats(model, probes, site=site, layers=layers, batch_size=batch_size,
                                  keep_per_prompt=True, meta=info))  # fmt: skip
    return out[0], out[1]


def contrastive_direction(
    model: Any,
    positive: ProbeSet,
    negative: ProbeSet,
    method: str | Callable = "mean_difference",
    *,
    site: str = "resid_post",
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    meta: dict[str, Any] | None = None,
    **options: Any,
) -> Direction:
    """The direction from ``negative`` toward ``positive`` prompts on one checkpoint.

    Args:
        model: one TransformerLens model (one checkpoint).
        positive: e.g. harmful prompts; the direction points toward them.
        negative: e.g. harmless prompts. The paired methods (``principal_component``, ``uncentred_pca``)
            pair prompt ``i`` with prompt ``i`` and need equal sizes.
        method: a name in :data:`~reversion_lens.directions.ESTIMATORS` or such a function.
        site, layers, batch_size: as for :func:`~reversion_lens.residual_stats`.
        meta: extra provenance stored with the statistics (e.g. ``{"checkpoint": "aligned"}``).
        **options: passed to the estimator (e.g. ``l2=`` for ``logistic``).

    Returns:
        A :class:`~reversion_lens.Direction` whose provenance has ``probes`` = both probe descriptions
        (positive first) and ``contrast`` = their names.
    """
    pos, neg = contrastive_stats(model, positive, negative, site=site, layers=layers, batch_size=batch_size, meta=meta)
    d = _estimator(method)(pos, neg, same_probes=False, **options)
    contrast = {"positive": positive.name, "negative": negative.name}
    return dataclasses.replace(d, provenance={**d.provenance, "contrast": contrast})


# ------------------------------------------------------------------ pure scores
def projections(direction: Direction, stats: ResidStats) -> Float[Tensor, "prompt layer"]:
    """Each prompt's projection ``x.v_l`` onto the direction, for the layers both cover (float64)."""
    if stats.per_prompt is None:
        raise ShapeError("projections need per-prompt vectors: residual_stats(..., keep_per_prompt=True).")
    if stats.site != direction.site:
        raise ShapeError(f"statistics are at site {stats.site!r} but the direction is at {direction.site!r}.")
    idx = [stats.layer_index(layer) for layer in direction.layers]
    x = stats.per_prompt[:, idx].double()
    return (x * direction.vectors.double().cpu()[None]).sum(-1)


def auroc(pos: Any, neg: Any) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney U / (n_pos n_neg))."""
    p, n = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    if p.size == 0 or n.size == 0:
        raise ShapeError("auroc needs at least one positive and one negative score.")
    ranks = _sps.rankdata(np.concatenate([p, n]))
    return float((ranks[: p.size].sum() - p.size * (p.size + 1) / 2) / (p.size * n.size))


def standardized_mean_difference(pos: Any, neg: Any) -> float:
    """Cohen's d: ``(mean_pos - mean_neg) / pooled sd`` (ddof=1); ``inf`` when both sets are constant."""
    p, n = np.asarray(pos, dtype=np.float64).ravel(), np.asarray(neg, dtype=np.float64).ravel()
    if p.size + n.size < 3:
        raise ShapeError("a standardized mean difference needs at least 3 scores in all.")
    pooled = (p.size - 1) * p.var(ddof=1 if p.size > 1 else 0) + (n.size - 1) * n.var(ddof=1 if n.size > 1 else 0)
    sd = (pooled / (p.size + n.size - 2)) ** 0.5
    diff = float(p.mean() - n.mean())
    return diff / sd if sd > 0 else (np.inf * np.sign(diff) if diff else 0.0)


def _split(n: int, holdout: float, g: torch.Generator, need: int) -> tuple[list[int], list[int]]:
    if holdout == 0:
        idx = list(range(n))
        return idx, idx
    n_test = max(1, round(holdout * n))
    if n - n_test < need:
        raise ShapeError(f"{n} prompts leave fewer than {need} to fit on with holdout={holdout}; use more prompts.")
    perm = torch.randperm(n, generator=g).tolist()
    return sorted(perm[n_test:]), sorted(perm[:n_test])


def _subset(stats: ResidStats, index: list[int] | None = None, layers: Sequence[int] | None = None) -> ResidStats:
    """The statistics of some prompts (``index``) at some of the layers (``layers``), from per-prompt vectors."""
    pp = stats.per_prompt if index is None else stats.per_prompt[index]  # type: ignore[index]
    if layers is not None:
        pp = pp[:, [stats.layer_index(layer) for layer in layers]]
    kept = stats.layers if layers is None else tuple(layers)
    return ResidStats(pp.double().sum(0), pp.shape[0], kept, stats.site, per_prompt=pp, meta=dict(stats.meta))


def rank_layers(
    positive: ResidStats,
    negative: ResidStats,
    method: str | Callable = "mean_difference",
    *,
    holdout: float = 0.25,
    seed: int = 0,
    by: str = "auroc",
    same_probes: bool = False,
    layers: Sequence[int] | None = None,
    **options: Any,
) -> Any:
    """Rank layers by how well the projection onto a direction fitted on part of the prompts separates the rest.

    Per set, ``holdout`` of the prompts (a seeded split; the same split for both sets when ``same_probes``,
    keeping pairs together) are held out; the direction is fitted on the others with ``method`` (any
    estimator, ``**options`` passed to it); the held-out prompts' projections onto each layer's vector are
    scored by AUROC (positive above negative) and by the standardized mean difference. ``holdout=0``
    scores in-sample. ``layers``: a subset of the statistics' layers (``None``: all).

    Returns:
        A DataFrame, best layer first: ``rank, layer, auroc, smd, train_auroc, train_smd, n_fit, n_test,
        method, site``.
    """
    import pandas as pd

    if by not in ("auroc", "smd"):
        raise ConfigError(f"by={by!r}; rank by 'auroc' or 'smd'.")
    if not 0 <= holdout < 1:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}.")
    if positive.per_prompt is None or negative.per_prompt is None:
        raise ShapeError("rank_layers needs per-prompt vectors: residual_stats(..., keep_per_prompt=True).")
    if layers is not None:
        positive, negative = _subset(positive, layers=layers), _subset(negative, layers=layers)
    fit = _estimator(method)
    name = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    need = 2 if name in ("principal_component", "uncentred_pca") else 1
    g = torch.Generator().manual_seed(int(seed))
    p_fit, p_test = _split(positive.count, holdout, g, need)
    n_fit, n_test = (p_fit, p_test) if same_probes else _split(negative.count, holdout, g, need)
    direction = fit(_subset(positive, p_fit), _subset(negative, n_fit), same_probes=same_probes, **options)
    proj_p, proj_n = projections(direction, positive), projections(direction, negative)
    rows = []
    for i, layer in enumerate(direction.layers):
        tp, tn = proj_p[p_test, i], proj_n[n_test, i]
        fp, fn = proj_p[p_fit, i], proj_n[n_fit, i]
        rows.append({
            "layer": layer, "auroc": auroc(tp, tn), "smd": standardized_mean_difference(tp, tn),
            "train_auroc": auroc(fp, fn), "train_smd": standardized_mean_difference(fp, fn),
            "n_fit": len(p_fit) + len(n_fit), "n_test": len(p_test) + len(n_test), "method": name,
            "site": positive.site,
        })  # fmt: skip
    table = pd.DataFrame(rows)
    other = "smd" if by == "auroc" else "auroc"
    table = table.sort_values([by, other, "layer"], ascending=[False, False, True], kind="stable").reset_index(
        drop=True
    )
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def rank_layers_by_score(direction: Direction, stats: ResidStats, score: Any, *, by: str = "spearman") -> Any:
    """Rank layers by how well each prompt's projection onto the direction predicts its ``score``.

    Args:
        direction: the direction (e.g. from :func:`contrastive_direction` on *other* prompts).
        stats: per-prompt statistics of the prompts to score, at the direction's site.
        score: one number per prompt (a harm score, or a 0/1 label).
        by: ``"spearman"``, ``"pearson"`` or (0/1 labels only) ``"auroc"``.

    Returns:
        A DataFrame, best layer first: ``rank, layer, spearman, pearson, auroc`` (``auroc`` is NaN unless
        ``score`` is 0/1), ``n``.
    """
    import pandas as pd

    y = np.asarray(score, dtype=np.float64).ravel()
    proj = projections(direction, stats).numpy()
    if y.shape[0] != proj.shape[0]:
        raise ShapeError(f"{y.shape[0]} scores for {proj.shape[0]} prompts; give one score per prompt.")
    if not np.isfinite(y).all() or np.unique(y).size < 2:
        raise ShapeError("scores must be finite and not all equal.")
    binary = set(np.unique(y).tolist()) <= {0.0, 1.0}
    if by not in ("spearman", "pearson", "auroc") or (by == "auroc" and not binary):
        raise ConfigError(f"by={by!r}; use 'spearman', 'pearson' or, for 0/1 labels, 'auroc'.")
    rows = []
    for i, layer in enumerate(direction.layers):
        x = proj[:, i]
        const = np.ptp(x) == 0
        rows.append({
            "layer": layer,
            "spearman": float("nan") if const else float(_sps.spearmanr(x, y).statistic),
            "pearson": float("nan") if const else float(np.corrcoef(x, y)[0, 1]),
            "auroc": auroc(x[y == 1], x[y == 0]) if binary else float("nan"),
            "n": int(y.size),
        })  # fmt: skip
    table = pd.DataFrame(rows).sort_values([by, "layer"], ascending=[False, True], kind="stable", na_position="last")
    table = table.reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table
