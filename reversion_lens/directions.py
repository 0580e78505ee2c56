"""Directions: frozen, validated per-layer unit vectors with their provenance.

The reversion direction of a history is, per layer, the displacement of the probe activations from
the later (aligned) checkpoint back toward the earlier (base) one::

    v_rev[l] = normalize(mean_base[l] - mean_aligned[l])

Every estimator takes two statistics ``(first, second)`` at the same site and layers and returns a
:class:`Direction` pointing from ``second`` toward ``first``: base vs aligned checkpoints on one probe set
(the reversion direction), or, with ``same_probes=False``, two probe sets on one checkpoint (harmful vs
harmless prompts, :func:`reversion_lens.contrastive.contrastive_direction`). :data:`ESTIMATORS` lists them:

* :func:`mean_difference` (the default): ``normalize(mean_first - mean_second)``;
* :func:`principal_component`: top principal component of the *centred* paired differences;
* :func:`uncentred_pca`: top right-singular vector of the *uncentred* paired differences (steering-vectors'
  ``pca_aggregator``; repeng's ``pca_diff`` up to sign);
* :func:`logistic`: the normal of an L2-regularised logistic-regression hyperplane separating the two sets.

Paired estimators (the two PCAs) pair prompt ``i`` of ``first`` with prompt ``i`` of ``second``.
:func:`chain` (through intermediate checkpoints) and :func:`random_direction` (seeded controls) complete
the set.
"""

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import ResidStats
from .errors import DirectionError, ResultsFormatError, ShapeError
from .io import load_tensors, save_tensors
from .registry import ESTIMATORS

__all__ = [
    "Direction",
    "mean_difference",
    "principal_component",
    "chain",
    "random_direction",
    "uncentred_pca",
    "logistic",
    "fit_logistic",
    "ESTIMATORS",
    "vocab_readout",
    "Subspace",
    "as_subspace",
    "reversion_subspace",
    "random_subspace",
]

_EPS = 1e-12


def _unit_rows(x: Tensor, what: str, layers: Sequence[int]) -> tuple[Tensor, Tensor]:
    x = x.double()
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(1).nonzero().flatten().tolist()
        raise DirectionError(
            f"{what} has non-finite values at layer(s) {[layers[i] for i in bad]}; the statistics it came "
            "from contain NaN/inf. Recompute them (check the checkpoints and dtype)."
        )
    norms = x.norm(dim=1)
    zero = (norms < _EPS).nonzero().flatten().tolist()
    if zero:
        raise DirectionError(
            f"{what} has zero norm at layer(s) {[layers[i] for i in zero]}: the two statistics are identical "
            "there, so no direction is defined. Check that the checkpoints differ (e.g. base and aligned are not "
            "the same weights); for two prompt sets read at the last token, early layers see only that token, "
            "which a chat template makes the same for every prompt. Drop those layers with layers=[...]."
        )
    return (x / norms[:, None]).float(), norms.float()


@dataclass(frozen=True, eq=False)
class Direction:
    """Unit vectors ``[layer, d_model]`` for the layers in :attr:`layers`, at one site.

    Attributes:
        vectors: float32 unit vectors, one row per covered layer.
        norms: the raw displacement norm per layer (e.g. ``||mean_base - mean_aligned||``); 1.0 for
            random directions.
        layers: the model layers the rows belong to.
        site: the residual-stream site (``resid_post`` by default).
        provenance: how it was made (method, checkpoints, probe hash, seed...).
    """

    vectors: Float[Tensor, "layer d_model"]
    norms: Float[Tensor, " layer"]
    layers: tuple[int, ...]
    site: str = "resid_post"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        v = self.vectors
        if not isinstance(v, Tensor) or v.ndim != 2 or 0 in v.shape:
            raise DirectionError(
                f"vectors must be a non-empty 2-D tensor [layer, d_model], got {getattr(v, 'shape', type(v))}."
            )
        if len(self.layers) != v.shape[0]:
            raise DirectionError(
                f"{v.shape[0]} vectors but {len(self.layers)} layers {self.layers}; give one per layer."
            )
        if not isinstance(self.norms, Tensor) or self.norms.shape != (v.shape[0],):
            raise DirectionError(
                f"norms must have shape [{v.shape[0]}], got {tuple(getattr(self.norms, 'shape', ()))}."
            )
        if not torch.isfinite(self.norms).all():
            raise DirectionError(
                f"norms {self.norms.tolist()} are not finite; recompute the direction from finite statistics."
            )
        try:
            layers = [operator.index(x) for x in self.layers if not isinstance(x, bool)]
        except TypeError:
            layers = []
        if len(layers) != len(self.layers) or min(layers, default=0) < 0 or len(set(layers)) != len(layers):
            raise DirectionError(
                f"layers {self.layers} must be distinct non-negative layer indices, one per vector (use 3, not -1)."
            )
        unit, _ = _unit_rows(v, "direction", self.layers)
        if (v.double().norm(dim=1) - 1).abs().max() > 1e-4:
            raise DirectionError("direction vectors must be unit norm; build them with Direction.from_vectors.")
        object.__setattr__(self, "vectors", unit.to(v.device))
        object.__setattr__(self, "layers", tuple(layers))

    @classmethod
    def from_vectors(
        cls, vectors: Tensor, layers: Sequence[int] | None = None, site: str = "resid_post", **provenance: Any
    ) -> "Direction":
        """Normalise arbitrary non-zero vectors ``[layer, d_model]`` (or ``[d_model]`` for one layer)."""
        v = torch.as_tensor(vectors)
        if v.ndim == 1:
            v = v[None]
        layers = tuple(range(v.shape[0])) if layers is None else tuple(layers)
        if v.ndim != 2:
            raise DirectionError(
                f"vectors must be [layer, d_model] (or [d_model] for one layer), got shape {tuple(v.shape)}."
            )
        if len(layers) != v.shape[0]:
            raise DirectionError(
                f"vectors of shape {tuple(v.shape)} do not match layers {layers}; give one layer per row."
            )
        unit, norms = _unit_rows(v, "direction", layers)
        return cls(unit, norms, layers, site, dict(provenance))

    # -------------------------------------------------------------- access
    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> Float[Tensor, " d_model"]:
        """The unit vector at model layer ``layer``."""
        try:
            return self.vectors[self.layers.index(layer)]
        except ValueError:
            raise DirectionError(f"this direction covers layers {self.layers}, not layer {layer}.") from None

    def select(self, layers: Sequence[int]) -> "Direction":
        idx = [self.layers.index(x) if x in self.layers else None for x in layers]
        if None in idx:
            missing = [x for x, i in zip(layers, idx) if i is None]
            raise DirectionError(f"layers {missing} are not covered by this direction (covers {self.layers}).")
        return dataclasses.replace(self, vectors=self.vectors[idx], norms=self.norms[idx], layers=tuple(layers))

    def to(self, *args: Any, **kwargs: Any) -> "Direction":
        """A copy on another device/dtype (the unit-norm check is in float64, so any dtype is fine)."""
        return dataclasses.replace(self, vectors=self.vectors.to(*args, **kwargs))

    def check_model(self, model: Any) -> None:
        """Raise :class:`ShapeError` if this direction cannot be applied to ``model``."""
        D, L = int(model.cfg.d_model), int(model.cfg.n_layers)
        if self.d_model != D:
            raise ShapeError(
                f"direction has d_model {self.d_model} but the model has {D}; it was derived for another model."
            )
        if max(self.layers) >= L:
            raise ShapeError(f"direction covers layer {max(self.layers)} but the model has only {L} layers.")

    # -------------------------------------------------------------- persistence
    def save(self, path: str | Path, key: str = "v_rev") -> Path:
        meta = {"kind": "direction", "key": key, "layers": list(self.layers), "site": self.site}
        meta["provenance"] = self.provenance
        return save_tensors(path, {key: self.vectors.float(), "norms": self.norms.float()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        tensors, meta = load_tensors(path)
        key = meta.get("key", "v_rev")
        if meta.get("kind") != "direction" or key not in tensors:
            raise ResultsFormatError(f"{path} does not hold a direction (written by Direction.save).")
        return cls(tensors[key], tensors["norms"], tuple(meta["layers"]), meta["site"], meta.get("provenance", {}))


# ------------------------------------------------------------------ constructors
def _check_pair(a: ResidStats, b: ResidStats, same_probes: bool = True) -> None:
    if a.layers != b.layers or a.site != b.site or a.d_model != b.d_model:
        raise ShapeError(
            f"statistics do not match: layers {a.layers} vs {b.layers}, site {a.site} vs {b.site}, "
            f"d_model {a.d_model} vs {b.d_model}. Compute both with the same site and layers."
        )
    pa, pb = a.meta.get("probes", {}).get("hash"), b.meta.get("probes", {}).get("hash")
    if same_probes and pa and pb and pa != pb:
        raise ShapeError(
            f"statistics come from different probe sets ({pa} vs {pb}); use the same probes for both, or pass "
            "same_probes=False for two contrasting sets on one checkpoint (reversion_lens.contrastive)."
        )


def _provenance(method: str, *stats: ResidStats, same_probes: bool = True, **extra: Any) -> dict[str, Any]:
    if same_probes:
        probes: Any = stats[0].meta.get("probes", {}).get("hash")
    else:  # two contrasting probe sets: record both
        probes = [s.meta.get("probes", {}) for s in stats]
    return {"method": method, "checkpoints": [s.meta.get("checkpoint") for s in stats], "probes": probes, **extra}


def mean_difference(first: ResidStats, second: ResidStats, *, same_probes: bool = True) -> Direction:
    """The default v_rev: ``normalize(mean_first - mean_second)`` per layer; norms are the raw distances.

    Args:
        first: e.g. the base checkpoint's statistics (or the harmful prompts').
        second: e.g. the aligned checkpoint's (or the harmless prompts'), at the same site and layers.
        same_probes: require both to come from one probe set (the history case); ``False`` for two
            contrasting probe sets on one checkpoint.
    """
    _check_pair(first, second, same_probes)
    unit, norms = _unit_rows(first.mean - second.mean, "mean_first - mean_second", first.layers)
    prov = _provenance("mean_difference", first, second, same_probes=same_probes)
    return Direction(unit, norms, first.layers, first.site, prov)


def _paired_differences(first: ResidStats, second: ResidStats, what: str) -> Float[Tensor, "layer prompt d_model"]:
    if first.per_prompt is None or second.per_prompt is None:
        raise ShapeError(f"{what} needs per-prompt vectors: residual_stats(..., keep_per_prompt=True).")
    if first.per_prompt.shape[0] != second.per_prompt.shape[0]:
        raise ShapeError(
            f"{what} pairs prompt i of one set with prompt i of the other, but the sets have "
            f"{first.per_prompt.shape[0]} and {second.per_prompt.shape[0]} prompts; give paired sets of equal size, "
            "or use mean_difference/logistic."
        )
    disp = (first.per_prompt - second.per_prompt).double().transpose(0, 1)  # [layer, prompt, d]
    if disp.shape[1] < 2:
        raise ShapeError(f"{what} needs at least 2 prompts.")
    return disp


def _sign_aligned(vecs: Tensor, first: ResidStats, second: ResidStats, method: str, same_probes: bool) -> Direction:
    """Flip each layer's vector to point along the mean difference; ``norms`` are the mean-difference norms."""
    mean_dir = first.mean - second.mean
    sign = torch.sign((vecs * mean_dir).sum(1))
    sign[sign == 0] = 1
    unit, _ = _unit_rows(vecs * sign[:, None], method, first.layers)
    _, norms = _unit_rows(mean_dir, "mean_first - mean_second", first.layers)
    return Direction(unit, norms, first.layers, first.site, _provenance(method, first, second, same_probes=same_probes))


def principal_component(first: ResidStats, second: ResidStats, *, same_probes: bool = True) -> Direction:
    """Top principal component of the paired differences ``x_first[i] - x_second[i]``, *centred*.

    The differences are centred on their mean before the SVD, so this is the axis along which the
    differences *vary* most (not their mean; compare :func:`uncentred_pca`). Both statistics need
    ``keep_per_prompt=True`` and the same number of prompts (prompt ``i`` paired with prompt ``i``).
    The sign is chosen so that the component points along the mean difference; ``norms`` hold the
    mean-difference norms.
    """
    _check_pair(first, second, same_probes)
    disp = _paired_differences(first, second, "principal_component")
    centred = disp - disp.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return _sign_aligned(vh[:, 0, :], first, second, "principal_component", same_probes)


def uncentred_pca(first: ResidStats, second: ResidStats, *, same_probes: bool = True) -> Direction:
    """Top right-singular vector of the *uncentred* paired differences (steering-vectors' ``pca_aggregator``).

    The principal axis of ``{d_i} u {-d_i}`` with ``d_i = x_first[i] - x_second[i]``, i.e. the top
    eigenvector of ``sum_i d_i d_i^T``: dominated by the mean difference when the differences agree,
    unlike :func:`principal_component`. Sign-aligned with the mean difference (steering-vectors flips it
    toward the mean of ``d_i @ v``: the same rule); ``norms`` hold the mean-difference norms. Needs
    ``keep_per_prompt=True`` and paired sets of equal size.
    """
    _check_pair(first, second, same_probes)
    disp = _paired_differences(first, second, "uncentred_pca")
    _, _, vh = torch.linalg.svd(disp, full_matrices=False)
    return _sign_aligned(vh[:, 0, :], first, second, "uncentred_pca", same_probes)


def fit_logistic(
    x: Float[Tensor, "n d_model"], y: Float[Tensor, " n"], l2: float = 1e-2, max_iter: int = 100, tol: float = 1e-10
) -> tuple[Float[Tensor, " d_model"], float]:
    """L2-regularised logistic regression by Newton's method in float64 (deterministic, no sklearn).

    Minimises ``mean_i log(1 + exp(-s_i (x_i.w + b))) + l2 / 2 * sigma^2 * ||w||^2`` with ``s_i = 2 y_i - 1``,
    an unpenalised intercept ``b`` and ``sigma^2`` the features' mean variance (so ``l2`` does not depend on
    the activations' scale). Newton runs in the row space of the centred data (the optimal ``w`` lies
    there), so its cost is ``O(n^2 d)`` for ``n`` prompts, whatever ``d_model``.

    Returns:
        ``(w, b)`` in the coordinates of ``x``: the logit of ``y = 1`` is ``x.w + b``.
    """
    x = x.double()
    y = y.double()
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ShapeError(f"fit_logistic needs x [n, d] and y [n], got {tuple(x.shape)} and {tuple(y.shape)}.")
    if not ((y == 0) | (y == 1)).all() or y.min() == y.max():
        raise ShapeError("fit_logistic needs labels 0/1 with both classes present.")
    if not l2 > 0:
        raise ShapeError(f"l2 must be > 0 (separable sets have no unregularised optimum), got {l2}.")
    mu = x.mean(0)
    xc = x - mu
    sigma2 = float((xc**2).mean())
    if sigma2 == 0:
        raise DirectionError("all activations are identical; no hyperplane separates the two sets.")
    u, sv, vh = torch.linalg.svd(xc / sigma2**0.5, full_matrices=False)
    keep = sv > sv[0] * 1e-10
    feats = u[:, keep] * sv[keep]  # [n, r]: the scaled data in an orthonormal basis of its row span
    n, r = feats.shape
    z = torch.cat([feats, torch.ones(n, 1, dtype=torch.float64)], 1)
    s = 2 * y - 1
    pen = torch.full((r + 1,), float(l2), dtype=torch.float64)
    pen[-1] = 0.0

    def objective(theta: Tensor) -> Tensor:
        return torch.nn.functional.softplus(-s * (z @ theta)).mean() + 0.5 * (pen * theta**2).sum()

    theta = torch.zeros(r + 1, dtype=torch.float64)
    for it in range(max_iter + 1):
        m = z @ theta
        p = torch.sigmoid(-s * m)  # = 1 - P(correct label)
        grad = z.T @ (-s * p) / n + pen * theta
        if grad.abs().max() < tol:
            break
        if it == max_iter:
            if grad.abs().max() > 1e-6:
                raise DirectionError(
                    f"logistic regression did not converge in {max_iter} Newton steps (gradient "
                    f"{float(grad.abs().max()):.1e}); raise l2 (now {l2}) or max_iter."
                )
            break
        weight = p * (1 - p)
        hess = (z.T * weight) @ z / n + torch.diag(pen)
        step = torch.linalg.solve(hess + 1e-12 * torch.eye(r + 1, dtype=torch.float64), grad)
        f0, t = objective(theta), 1.0
        while objective(theta - t * step) > f0 - 1e-4 * t * (grad @ step) and t > 1e-10:
            t *= 0.5
        theta = theta - t * step
    w_scaled = vh[keep].T @ theta[:-1]  # back to the feature axes of x / sigma
    w = w_scaled / sigma2**0.5
    b = float(theta[-1] - mu @ w)
    return w, b


def logistic(first: ResidStats, second: ResidStats, *, same_probes: bool = True, l2: float = 1e-2) -> Direction:
    """Per layer, the unit normal of the logistic-regression hyperplane separating ``first`` from ``second``.

    Fits :func:`fit_logistic` on the per-prompt vectors (label 1 for ``first``, 0 for ``second``; sets may
    differ in size), so the vector points toward ``first``. ``l2`` is relative to the activations' mean
    variance. ``norms`` hold the mean-difference norms; ``provenance["train_accuracy"]`` the per-layer
    accuracy of the fitted classifier on its own training prompts.
    """
    _check_pair(first, second, same_probes)
    if first.per_prompt is None or second.per_prompt is None:
        raise ShapeError("logistic needs per-prompt vectors: residual_stats(..., keep_per_prompt=True).")
    a, b_ = first.per_prompt.double(), second.per_prompt.double()
    y = torch.cat([torch.ones(a.shape[0]), torch.zeros(b_.shape[0])]).double()
    rows, acc = [], []
    for i in range(len(first.layers)):
        x = torch.cat([a[:, i], b_[:, i]])
        w, b = fit_logistic(x, y, l2)
        rows.append(w)
        acc.append(float(((x @ w + b > 0).double() == y).double().mean()))
    unit, _ = _unit_rows(torch.stack(rows), "logistic normal", first.layers)
    _, norms = _unit_rows(first.mean - second.mean, "mean_first - mean_second", first.layers)
    prov = _provenance("logistic", first, second, same_probes=same_probes, l2=float(l2), train_accuracy=acc)
    return Direction(unit, norms, first.layers, first.site, prov)


def chain(stats: Sequence[ResidStats], weights: Sequence[float] | None = None) -> Direction:
    """A direction through intermediate checkpoints ``[earliest, ..., latest]``.

    Each segment's unit step back, ``normalize(mean[k] - mean[k+1])``, is weighted (equal by default)
    and the sum normalised: a long early segment does not drown out a short late one, as it would in
    the plain endpoint difference (which is ``mean_difference(stats[0], stats[-1])``).
    """
    if len(stats) < 2:
        raise ShapeError("chain needs at least two statistics, earliest first.")
    for s in stats[1:]:
        _check_pair(stats[0], s)
    w = [1.0] * (len(stats) - 1) if weights is None else list(weights)
    if len(w) != len(stats) - 1:
        raise ShapeError(f"{len(stats) - 1} segments but {len(w)} weights.")
    total = torch.zeros_like(stats[0].mean)
    for k in range(len(stats) - 1):
        seg, _ = _unit_rows(stats[k].mean - stats[k + 1].mean, f"segment {k}", stats[0].layers)
        total += w[k] * seg.double()
    unit, _ = _unit_rows(total, "chained direction", stats[0].layers)
    _, norms = _unit_rows(stats[0].mean - stats[-1].mean, "endpoint difference", stats[0].layers)
    return Direction(unit, norms, stats[0].layers, stats[0].site, _provenance("chain", *stats, weights=w))


def random_direction(
    d_model: int, layers: Sequence[int], seed: int, site: str = "resid_post", like: Direction | None = None
) -> Direction:
    """Seeded isotropic random unit vectors, a control direction of the same shape as a real one.

    ``like`` copies its norms (so a random block has "the same norm" as the v_rev block it controls).
    """
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(len(layers), d_model, generator=g, dtype=torch.float64)
    unit, _ = _unit_rows(v, "random direction", layers)
    norms = like.norms.clone() if like is not None else torch.ones(len(layers))
    return Direction(unit, norms, tuple(layers), site, {"method": "random", "seed": int(seed)})


#: The estimators by name (a registry: ``ESTIMATORS["logistic"].obj``), each
#: ``f(first, second, *, same_probes=True, **options) -> Direction``; ``per_prompt``: it needs the
#: statistics' per-prompt vectors (``residual_stats(..., keep_per_prompt=True)``).
ESTIMATORS.register("mean_difference", mean_difference, per_prompt=False, doc="normalize(mean_first - mean_second)")
ESTIMATORS.register(
    "principal_component",
    principal_component,
    per_prompt=True,
    doc="top principal component of the centred paired differences, sign-aligned",
)
ESTIMATORS.register(
    "uncentred_pca",
    uncentred_pca,
    per_prompt=True,
    doc="top singular vector of the uncentred paired differences (steering-vectors' pca_aggregator)",
)
ESTIMATORS.register("logistic", logistic, per_prompt=True, doc="normal of an L2-regularised logistic regression")


# ------------------------------------------------------------------ subspaces (k directions per layer)
@dataclass(frozen=True, eq=False)
class Subspace:
    """A ``k``-dimensional subspace per layer: orthonormal rows ``basis[i]`` ``[k, d_model]`` for ``layers[i]``.

    Row 0 of each layer is the leading direction (for :func:`reversion_subspace`, the mean-difference
    v_rev itself), so ``subspace.direction`` is the one-vector :class:`Direction` it extends and
    ``subspace.truncate(j)`` the nested subspace of its first ``j`` rows. The alignment of a drift ``d``
    with it is ``||P_S d|| / ||d||`` (:func:`reversion_lens.drift.subspace_alignment`).

    Attributes:
        basis: float32 ``[layer, k, d_model]``, orthonormal rows per layer.
        norms: the leading direction's raw norms per layer (``||mean_base - mean_aligned||``).
        layers: the model layers the rows belong to.
        site: the residual-stream site.
        provenance: how it was made.
    """

    basis: Float[Tensor, "layer k d_model"]
    norms: Float[Tensor, " layer"]
    layers: tuple[int, ...]
    site: str = "resid_post"
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b = self.basis
        if not isinstance(b, Tensor) or b.ndim != 3 or 0 in b.shape:
            raise DirectionError(f"basis must be a non-empty [layer, k, d_model] tensor, got {getattr(b, 'shape', b)}.")
        if len(self.layers) != b.shape[0] or self.norms.shape != (b.shape[0],):
            raise DirectionError(
                f"basis has {b.shape[0]} layers; layers={self.layers}, norms {tuple(self.norms.shape)}."
            )
        if b.shape[1] > b.shape[2]:
            raise DirectionError(f"a subspace of dimension k={b.shape[1]} does not fit in d_model={b.shape[2]}.")
        gram = b.double() @ b.double().transpose(1, 2)
        eye = torch.eye(b.shape[1], dtype=torch.float64, device=gram.device)
        if not torch.isfinite(gram).all() or (gram - eye).abs().max() > 1e-4:
            raise DirectionError("subspace basis rows must be orthonormal per layer; build it with reversion_subspace.")
        Direction(b[:, 0].float(), self.norms, self.layers, self.site)  # validates the layers and leading rows

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    @property
    def d_model(self) -> int:
        return int(self.basis.shape[2])

    @property
    def vectors(self) -> Float[Tensor, "layer d_model"]:
        """The leading row of each layer (as :attr:`Direction.vectors`)."""
        return self.basis[:, 0]

    @property
    def direction(self) -> Direction:
        """The leading direction as a :class:`Direction` (the mean difference, for :func:`reversion_subspace`)."""
        return Direction(self.basis[:, 0].float(), self.norms, self.layers, self.site, dict(self.provenance))

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> Float[Tensor, "k d_model"]:
        """The orthonormal rows ``[k, d_model]`` at model layer ``layer``."""
        try:
            return self.basis[self.layers.index(layer)]
        except ValueError:
            raise DirectionError(f"this subspace covers layers {self.layers}, not layer {layer}.") from None

    def select(self, layers: Sequence[int]) -> "Subspace":
        missing = [x for x in layers if x not in self.layers]
        if missing:
            raise DirectionError(f"layers {missing} are not covered by this subspace (covers {self.layers}).")
        idx = [self.layers.index(x) for x in layers]
        return dataclasses.replace(self, basis=self.basis[idx], norms=self.norms[idx], layers=tuple(layers))

    def truncate(self, k: int) -> "Subspace":
        """The nested subspace of the first ``k`` rows of every layer."""
        if not 1 <= k <= self.k:
            raise DirectionError(f"cannot truncate a {self.k}-dimensional subspace to k={k}.")
        return dataclasses.replace(self, basis=self.basis[:, :k], provenance={**self.provenance, "k": k})

    def check_model(self, model: Any) -> None:
        self.direction.check_model(model)

    def save(self, path: str | Path) -> Path:
        meta = {"kind": "subspace", "layers": list(self.layers), "site": self.site, "provenance": self.provenance}
        return save_tensors(path, {"basis": self.basis.float(), "norms": self.norms.float()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Subspace":
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "subspace":
            raise ResultsFormatError(f"{path} does not hold a subspace (written by Subspace.save).")
        return cls(tensors["basis"], tensors["norms"], tuple(meta["layers"]), meta["site"], meta.get("provenance", {}))


def as_subspace(x: "Direction | Subspace") -> Subspace:
    """A :class:`Subspace` as it is, a :class:`Direction` as the ``k = 1`` subspace of its vectors."""
    if isinstance(x, Subspace):
        return x
    if isinstance(x, Direction):
        return Subspace(x.vectors[:, None, :], x.norms, x.layers, x.site, dict(x.provenance))
    raise DirectionError(f"expected a Direction or a Subspace, got {type(x).__name__}.")


def reversion_subspace(base: ResidStats, aligned: ResidStats, k: int) -> Subspace:
    """v_rev as a ``k``-dimensional subspace per layer: the mean difference plus the top ``k - 1`` principal
    components of the per-prompt displacements ``x_base[i] - x_aligned[i]`` orthogonal to it.

    Projected off the mean-difference direction, the displacements have mean zero, so their centred and
    uncentred principal components coincide. Row 0 of each layer is exactly :func:`mean_difference`'s
    vector, so ``k = 1`` is v_rev itself and the subspaces are nested in ``k``. Needs per-prompt vectors
    (``residual_stats(..., keep_per_prompt=True)``) of paired probe sets; ``k - 1`` may not exceed the
    rank of the orthogonal displacements (at most ``n_prompts - 1``).
    """
    if not isinstance(k, int) or k < 1:
        raise DirectionError(f"k must be a positive integer, got {k!r}.")
    lead = mean_difference(base, aligned)
    if k > lead.d_model:
        raise DirectionError(f"k={k} exceeds d_model={lead.d_model}.")
    rows = [lead.vectors.double()[:, None, :]]
    if k > 1:
        disp = _paired_differences(base, aligned, "reversion_subspace")  # [layer, prompt, d]
        v = lead.vectors.double()
        orth = disp - (disp @ v[:, :, None]) * v[:, None, :]
        _, sv, vh = torch.linalg.svd(orth, full_matrices=False)
        if sv.shape[1] < k - 1 or (sv[:, k - 2] <= 1e-5 * sv[:, 0].clamp_min(1e-300)).any():
            raise DirectionError(
                f"the per-prompt displacements orthogonal to v_rev have rank < {k - 1} at some layer; use a smaller k "
                "or more probe prompts."
            )
        rows.append(vh[:, : k - 1, :])
    basis = torch.cat(rows, 1)
    q, _ = torch.linalg.qr(basis.transpose(1, 2))  # re-orthonormalise in float64; keep the leading row's sign
    q = q.transpose(1, 2) * torch.sign((q.transpose(1, 2) * basis).sum(2, keepdim=True))
    prov = {**lead.provenance, "method": "reversion_subspace", "k": k}
    return Subspace(q.float(), lead.norms, lead.layers, lead.site, prov)


def random_subspace(d_model: int, layers: Sequence[int], k: int, seed: int, site: str = "resid_post",
                    like: "Direction | Subspace | None" = None) -> Subspace:  # fmt: skip
    """Seeded isotropic random ``k``-dimensional subspaces (the control of a :class:`Subspace`)."""
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(len(layers), d_model, k, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(x)
    norms = like.norms.clone() if like is not None else torch.ones(len(layers))
    prov = {"method": "random", "seed": int(seed), "k": k}
    return Subspace(q.transpose(1, 2).float(), norms, tuple(layers), site, prov)


def vocab_readout(direction: Direction, model: Any, k: int = 10, tokenizer: Any = None) -> "Any":
    """Top and bottom ``k`` tokens of each layer's vector through the unembedding ``W_U``.

    Returns a DataFrame with columns ``layer, side, rank, token_id, token, score`` where
    ``score = v @ W_U``. (The final LayerNorm is not applied: this is the direct logit effect of adding
    ``v`` to the last residual stream, exact for the last layer up to the norm's scale.)
    """
    import pandas as pd

    from .sites import unembedding

    W_U = unembedding(model).float().cpu()
    direction.check_model(model)
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    rows = []
    for i, layer in enumerate(direction.layers):
        scores = direction.vectors[i].float().cpu() @ W_U
        k_eff = min(k, scores.numel())
        for side, (vals, idx) in (("top", scores.topk(k_eff)), ("bottom", (-scores).topk(k_eff))):
            for rank, (val, tid) in enumerate(zip(vals.tolist(), idx.tolist())):
                score = val if side == "top" else -val
                name = _token_str(tok, tid)
                rows.append(
                    {"layer": layer, "side": side, "rank": rank, "token_id": tid, "token": name, "score": score}
                )
    return pd.DataFrame(rows)


def _token_str(tok: Any, tid: int) -> str:
    if tok is None:
        return str(tid)
    for meth in ("to_string", "decode"):
        f = getattr(tok, meth, None)
        if f is not None:
            try:
                out = f([tid])
            except Exception:  # tokenizers differ in what they accept
                continue
            out = out if isinstance(out, str) else str(out)
            return out if out.strip() else f"<{tid}>"  # padding and control tokens decode to nothing
    return str(tid)
