"""Directions: frozen, validated per-layer unit vectors with their provenance.

The reversion direction of a history is, per layer, the displacement of the probe activations from
the later (aligned) checkpoint back toward the earlier (base) one::

    v_rev[l] = normalize(mean_base[l] - mean_aligned[l])

:func:`mean_difference` is that default; :func:`principal_component` (the top principal component of
per-prompt displacements, sign-aligned with the mean difference), :func:`chain` (through intermediate
checkpoints) and :func:`random_direction` (seeded controls) are the alternatives.
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

__all__ = [
    "Direction",
    "mean_difference",
    "principal_component",
    "chain",
    "random_direction",
    "vocab_readout",
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
            f"{what} has zero norm at layer(s) {[layers[i] for i in zero]}: the two model states give identical "
            "activations there, so no direction is defined. Check that the checkpoints differ (e.g. base and "
            "aligned are not the same weights), or drop those layers with layers=[...]."
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
            raise DirectionError(f"{v.shape[0]} vectors but {len(self.layers)} layers {self.layers}; give one per layer.")
        if not isinstance(self.norms, Tensor) or self.norms.shape != (v.shape[0],):
            raise DirectionError(f"norms must have shape [{v.shape[0]}], got {tuple(getattr(self.norms, 'shape', ()))}.")
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
            raise DirectionError(f"vectors of shape {tuple(v.shape)} do not match layers {layers}; give one layer per row.")
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
        return dataclasses.replace(
            self, vectors=self.vectors[idx], norms=self.norms[idx], layers=tuple(layers)
        )

    def to(self, *args: Any, **kwargs: Any) -> "Direction":
        """A copy on another device/dtype (the unit-norm check is in float64, so any dtype is fine)."""
        return dataclasses.replace(self, vectors=self.vectors.to(*args, **kwargs))

    def check_model(self, model: Any) -> None:
        """Raise :class:`ShapeError` if this direction cannot be applied to ``model``."""
        D, L = int(model.cfg.d_model), int(model.cfg.n_layers)
        if self.d_model != D:
            raise ShapeError(f"direction has d_model {self.d_model} but the model has {D}; it was derived for another model.")
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
def _check_pair(a: ResidStats, b: ResidStats) -> None:
    if a.layers != b.layers or a.site != b.site or a.d_model != b.d_model:
        raise ShapeError(
            f"statistics do not match: layers {a.layers} vs {b.layers}, site {a.site} vs {b.site}, "
            f"d_model {a.d_model} vs {b.d_model}. Compute both with the same site and layers."
        )
    pa, pb = a.meta.get("probes", {}).get("hash"), b.meta.get("probes", {}).get("hash")
    if pa and pb and pa != pb:
        raise ShapeError(f"statistics come from different probe sets ({pa} vs {pb}); use the same probes for both.")


def _provenance(method: str, *stats: ResidStats, **extra: Any) -> dict[str, Any]:
    return {
        "method": method,
        "checkpoints": [s.meta.get("checkpoint") for s in stats],
        "probes": stats[0].meta.get("probes", {}).get("hash"),
        **extra,
    }


def mean_difference(base: ResidStats, aligned: ResidStats) -> Direction:
    """The default v_rev: ``normalize(mean_base - mean_aligned)`` per layer; norms are the raw distances."""
    _check_pair(base, aligned)
    unit, norms = _unit_rows(base.mean - aligned.mean, "mean_base - mean_aligned", base.layers)
    return Direction(unit, norms, base.layers, base.site, _provenance("mean_difference", base, aligned))


def principal_component(base: ResidStats, aligned: ResidStats) -> Direction:
    """Top principal component of the per-prompt displacements ``x_base[i] - x_aligned[i]``.

    Both statistics need ``keep_per_prompt=True`` on the same probe set (paired prompts). The sign is
    chosen so that the component points along the mean difference. The PC is of the *uncentred*
    displacements' covariance around their mean; ``norms`` hold the mean-difference norms.
    """
    _check_pair(base, aligned)
    if base.per_prompt is None or aligned.per_prompt is None:
        raise ShapeError("principal_component needs per-prompt vectors: residual_stats(..., keep_per_prompt=True).")
    disp = (base.per_prompt - aligned.per_prompt).double().transpose(0, 1)  # [layer, prompt, d]
    if disp.shape[1] < 2:
        raise ShapeError("principal_component needs at least 2 prompts.")
    centred = disp - disp.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    pc = vh[:, 0, :]  # [layer, d]
    mean_dir = base.mean - aligned.mean
    sign = torch.sign((pc * mean_dir).sum(1))
    sign[sign == 0] = 1
    unit, _ = _unit_rows(pc * sign[:, None], "principal component", base.layers)
    _, norms = _unit_rows(mean_dir, "mean_base - mean_aligned", base.layers)
    return Direction(unit, norms, base.layers, base.site, _provenance("principal_component", base, aligned))


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
                rows.append({"layer": layer, "side": side, "rank": rank, "token_id": tid, "token": name, "score": score})
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


# The v_rev estimators the experiment config can name (``direction = "..."``): fn(base, aligned) -> Direction.
from .registry import ESTIMATORS  # noqa: E402

ESTIMATORS.register("mean_difference", mean_difference, per_prompt=False,
                    doc="normalize(mean_base - mean_aligned) per layer")
ESTIMATORS.register("principal_component", principal_component, per_prompt=True,
                    doc="top principal component of the per-prompt displacements, sign-aligned")
