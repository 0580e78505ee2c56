"""Pure statistics for reversion directions: geometry, null models and summaries. Never runs a model.

Conventions
-----------
* Geometry (:func:`normalize`, :func:`cosine`, :func:`projection`, :func:`remove_component`) takes
  tensors, broadcasts over leading dims (e.g. ``[layer, d_model]`` against ``[d_model]``), computes in
  float64 and returns the promoted floating dtype of its inputs.
* Null samplers take an explicit ``seed`` (a fresh ``torch.Generator`` on the input's device) and return
  float64 tensors whose **last** axis indexes the draws: ``[..., n]``. Same inputs and seed, same numbers.
* Summaries of a handful of numbers (across seeds, say) accept lists, numpy arrays or tensors and return
  Python floats. Functions of plain numbers return floats; given a tensor, they return a float64 tensor.
* ``cosine(drift, direction)``: a zero *direction* is an error (:class:`DirectionError`); a zero *drift*
  (the model did not move) has cosine 0.0 by convention. Non-finite values in either raise.
"""

import math
from collections.abc import Sequence

import numpy as np
import scipy.stats
import torch
from jaxtyping import Float
from torch import Tensor

from reversion_lens.errors import DirectionError, NonFiniteError, ShapeError

__all__ = [
    "MIN_NORM",
    "normalize",
    "cosine",
    "projection",
    "remove_component",
    "isotropic_quantile",
    "isotropic_pvalue",
    "isotropic_null_samples",
    "covariance",
    "matched_null_samples",
    "matched_quantile",
    "random_direction_samples",
    "permutation_null_samples",
    "empirical_pvalue",
    "mean_std",
    "format_mean_std",
    "bootstrap_ci",
    "paired_differences",
    "describe",
    "paired_test",
    "spearman",
    "fraction_above",
]

MIN_NORM = 1e-12  # absolute: a vector with a smaller L2 norm (in float64) counts as zero
_CHUNK_ELEMENTS = 1 << 22  # bound on Gaussian draws held in memory at once (~32 MB of float64)

ArrayLike = Tensor | np.ndarray | Sequence[float]
Number = float | int
# Shapes under the default dim=-1; "#" marks leading dims that broadcast between arguments.
Vectors = Float[Tensor, "*#batch d_model"]
PerRow = Float[Tensor, "*#batch"]
Covariances = Float[Tensor, "*#batch d_model d_model"]


# ----------------------------------------------------------------------------------------- checks


def _row_label(index: tuple[int, ...]) -> str:
    return "the vector" if not index else f"row {index[0] if len(index) == 1 else index}"


def _check_finite(x: Tensor, name: str, dim: int) -> None:
    bad = ~torch.isfinite(x).all(dim=dim)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise DirectionError(
            f"{name} (shape {list(x.shape)}) has NaN or inf values in {_row_label(index)} "
            f"({int(bad.sum())} bad row(s) in all). Fix the source: look for overflow in the activations "
            f"(run in float32 or float64) or drop the non-finite prompts/layers before comparing."
        )


def _check_nonzero(norm: Tensor, shape: Sequence[int], name: str) -> None:
    bad = norm < MIN_NORM
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise DirectionError(
            f"{name} (shape {list(shape)}) has zero norm in {_row_label(index)} "
            f"(|{name}| = {float(norm[index]):.3g} < {MIN_NORM:g}; {int(bad.sum())} zero row(s) in all). "
            f"A direction must be nonzero: check that the two checkpoints' means differ at that layer, "
            f"or leave that layer out."
        )


def _as_float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _out_dtype(*xs: Tensor) -> torch.dtype:
    dtype = _as_float(xs[0]).dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, _as_float(x).dtype)
    return dtype


def _unit64(v: Tensor, name: str, dim: int = -1) -> Tensor:
    """``v`` as float64 unit vectors along ``dim``, after the finite and nonzero checks."""
    v64 = torch.as_tensor(v).to(torch.float64)
    _check_finite(v64, name, dim)
    norm = v64.norm(dim=dim, keepdim=True)
    _check_nonzero(norm.squeeze(dim), v64.shape, name)
    return v64 / norm


def _vector_1d(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ShapeError(f"{name} must be a non-empty 1-D list of numbers, got shape {arr.shape}; flatten it first.")
    if not np.isfinite(arr).all():
        raise NonFiniteError(
            f"{name} has NaN or inf at index {int(np.flatnonzero(~np.isfinite(arr))[0])}; "
            f"drop the failed runs before summarising."
        )
    return arr


def _check_dim(d: int) -> int:
    if int(d) != d or d < 2:
        raise ShapeError(f"the isotropic null needs an integer dimension d >= 2, got {d}; pass d_model.")
    return int(d)


def _quantile(x: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile along the last axis (as ``torch.quantile``, without its size limit)."""
    if x.shape[-1] == 0:
        raise ShapeError("cannot take a quantile of zero samples; pass n >= 1 (thousands for a 99th percentile).")
    s = x.sort(dim=-1).values
    pos = q * (s.shape[-1] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[..., lo] + (pos - lo) * (s[..., hi] - s[..., lo])


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


# --------------------------------------------------------------------------------------- geometry


def normalize(x: Float[Tensor, "*batch d_model"], dim: int = -1) -> Float[Tensor, "*batch d_model"]:
    """Unit vectors along ``dim``; raises :class:`DirectionError` naming the first zero or non-finite row."""
    return _unit64(x, "x", dim).to(_out_dtype(x))


def cosine(a: Vectors, b: Vectors, dim: int = -1) -> PerRow:
    """Cosine similarity of drift ``a`` with direction ``b`` along ``dim`` (leading dims broadcast).

    ``b`` must be nonzero (else :class:`DirectionError`); rows where ``a`` is zero give 0.0.
    """
    b_unit = _unit64(b, "b", dim)
    a64 = a.to(torch.float64)
    _check_finite(a64, "a", dim)
    a_norm = a64.norm(dim=dim, keepdim=True)
    a_unit = torch.where(a_norm < MIN_NORM, torch.zeros_like(a64), a64 / a_norm.clamp_min(MIN_NORM))
    return (a_unit * b_unit).sum(dim=dim).clamp(-1.0, 1.0).to(_out_dtype(a, b))


def projection(x: Vectors, v: Vectors, dim: int = -1) -> PerRow:
    """Signed length of ``x`` along ``v``: ``x·v / |v|`` (``v`` nonzero)."""
    x64 = x.to(torch.float64)
    _check_finite(x64, "x", dim)
    return (x64 * _unit64(v, "v", dim)).sum(dim=dim).to(_out_dtype(x, v))


def remove_component(x: Vectors, v: Vectors, dim: int = -1) -> Vectors:
    """``x - (x·v̂) v̂``: ``x`` with its component along ``v`` projected out (``v`` nonzero)."""
    x64 = x.to(torch.float64)
    _check_finite(x64, "x", dim)
    v_unit = _unit64(v, "v", dim)
    return (x64 - (x64 * v_unit).sum(dim=dim, keepdim=True) * v_unit).to(_out_dtype(x, v))


# ------------------------------------------------------------------------------- isotropic null


def _beta_param(d: int) -> float:
    return (_check_dim(d) - 1) / 2.0


def _scipy_map(fn, x: Number | ArrayLike) -> float | Tensor:
    if isinstance(x, (float, int)):
        return float(fn(float(x)))
    arr = torch.as_tensor(x, dtype=torch.float64)
    return torch.from_numpy(np.asarray(fn(arr.cpu().numpy()), dtype=np.float64)).to(arr.device)


def isotropic_quantile(q: Number | ArrayLike, d: int) -> float | Tensor:
    """Exact ``q``-quantile of ``cos(u, e)`` for a fixed unit ``e`` and uniform random unit ``u`` in ``d`` dims.

    Uses ``(1 + C) / 2 ~ Beta((d-1)/2, (d-1)/2)``. ``isotropic_quantile(0.99, 768) ≈ 0.083879``.
    Returns a float for a number ``q``, a float64 tensor otherwise.
    """
    a = _beta_param(d)
    q_arr = np.asarray(torch.as_tensor(q, dtype=torch.float64).cpu())
    if not ((q_arr >= 0) & (q_arr <= 1)).all():
        raise ValueError(f"quantile level q must lie in [0, 1], got {q}; pass e.g. 0.99 for the 99th percentile.")
    return _scipy_map(lambda p: 2.0 * scipy.stats.beta.ppf(p, a, a) - 1.0, q)


def isotropic_pvalue(c: Number | ArrayLike, d: int) -> float | Tensor:
    """One-sided ``P(C >= c)`` under the isotropic null in ``d`` dims (float for a number, else a tensor)."""
    a = _beta_param(d)
    return _scipy_map(lambda x: scipy.stats.beta.sf((1.0 + np.clip(x, -1.0, 1.0)) / 2.0, a, a), c)


def isotropic_null_samples(d: int, n: int, seed: int = 0) -> Float[Tensor, " n"]:
    """Monte Carlo draws of ``cos(u, e_1)`` for ``n`` seeded uniform random unit vectors ``u`` in ``d`` dims."""
    d = _check_dim(d)
    gen, out = _generator(seed), []
    chunk = max(1, _CHUNK_ELEMENTS // d)
    for start in range(0, n, chunk):
        z = torch.randn(min(chunk, n - start), d, generator=gen, dtype=torch.float64)
        out.append(z[:, 0] / z.norm(dim=-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def random_direction_samples(x: Float[Tensor, "*batch d_model"], n: int, seed: int = 0) -> Float[Tensor, "*batch n"]:
    """Cosines of ``x`` with ``n`` seeded uniform random unit directions (the same ``n`` directions for every row)."""
    x_unit = _unit64(x, "x")
    gen, out = _generator(seed, x_unit.device), []
    d = x_unit.shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // d)
    for start in range(0, n, chunk):
        u = torch.randn(min(chunk, n - start), d, generator=gen, dtype=torch.float64, device=x_unit.device)
        out.append(x_unit @ (u / u.norm(dim=-1, keepdim=True)).T)
    return torch.cat(out, dim=-1) if out else x_unit.new_zeros((*x_unit.shape[:-1], 0))


# --------------------------------------------------------------------------- covariance-matched null


def covariance(samples: Float[Tensor, "*batch n d_model"]) -> Float[Tensor, "*batch d_model d_model"]:
    """Sample covariance (ddof=1, float64) of the rows of ``samples`` (leading dims batch, e.g. per layer)."""
    x = torch.as_tensor(samples).to(torch.float64)
    if x.ndim < 2 or x.shape[-2] < 2:
        raise ShapeError(
            f"covariance needs samples of shape [..., n, d] with n >= 2 rows, got {list(x.shape)}; "
            f"pass at least two prompts (or per-prompt displacements)."
        )
    if not torch.isfinite(x).all():
        raise NonFiniteError("covariance: samples contain NaN or inf; drop the non-finite prompts first.")
    xc = x - x.mean(dim=-2, keepdim=True)
    return xc.transpose(-1, -2) @ xc / (x.shape[-2] - 1)


def matched_null_samples(cov: Covariances, v: Vectors, n: int, seed: int = 0) -> Float[Tensor, "*batch n"]:
    """Draws of ``cos(z, v)`` for random drifts ``z ~ N(0, cov)`` (``cov`` PSD, possibly singular).

    ``cov`` is symmetrised and eigendecomposed; eigenvalues below ``d·eps·λ_max`` (round-off, including
    negatives) are set to 0, so a singular ``cov`` draws only from its support. Each
    cosine is computed in the eigenbasis without forming ``z``. Leading dims of ``cov`` and ``v`` broadcast.
    """
    cov64 = torch.as_tensor(cov).to(torch.float64)
    if cov64.ndim < 2 or cov64.shape[-1] != cov64.shape[-2] or cov64.shape[-1] != v.shape[-1]:
        raise ShapeError(
            f"cov must be [..., d, d] and v [..., d] with the same d; got {list(cov64.shape)} and "
            f"{list(v.shape)}. Build cov with covariance(samples) on the same site as v."
        )
    if not torch.isfinite(cov64).all():
        raise NonFiniteError("cov contains NaN or inf; recompute it from finite activations.")
    v_unit = _unit64(v, "v")
    evals, evecs = torch.linalg.eigh((cov64 + cov64.transpose(-1, -2)) / 2)
    top = evals.amax(dim=-1, keepdim=True)
    # round-off leaves |eigenvalues| ~ d·eps·λ_max where the true ones are 0: treat those (and negatives) as 0
    evals = torch.where(evals > top * evals.shape[-1] * torch.finfo(torch.float64).eps, evals, 0.0)
    if (top <= 0).any():
        raise ShapeError(
            "cov is zero (no variance), so random drifts have no direction; pass the covariance "
            "of activations or displacements that actually vary."
        )
    batch = torch.broadcast_shapes(evals.shape[:-1], v_unit.shape[:-1])
    sd = evals.sqrt().expand(*batch, -1)  # [*batch, d]
    w = sd * (evecs.transpose(-1, -2) @ v_unit.unsqueeze(-1)).squeeze(-1)  # z·v̂ = g·w, |z|² = Σ λ g²
    d, gen, rows = sd.shape[-1], _generator(seed, sd.device), max(1, math.prod(batch))
    chunk = max(1, min(n, _CHUNK_ELEMENTS // (d * rows)))
    # The draws and their scaled copy live in two buffers reused chunk after chunk. A fresh pair per chunk
    # (each just under glibc's largest mmap threshold) made the heap grow by gigabytes over 20000 draws
    # once anything had raised that threshold (scipy does): 2.7 GB for 30 layers x 576 (bench_memory.py).
    draws = sd.new_empty(rows * chunk * d)
    scaled = sd.new_empty(rows * chunk * d)
    out = sd.new_empty((*batch, n))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        g = draws[: rows * m * d].view(*batch, m, d)
        torch.randn(g.shape, generator=gen, dtype=torch.float64, device=sd.device, out=g)
        znorm = torch.mul(g, sd.unsqueeze(-2), out=scaled[: rows * m * d].view(*batch, m, d)).norm(dim=-1)
        out[..., start : start + m] = ((g @ w.unsqueeze(-1)).squeeze(-1) / znorm.clamp_min(MIN_NORM)).clamp(-1.0, 1.0)
    return out


def matched_quantile(
    cov: Covariances, v: Vectors, q: float = 0.99, n: int = 20000, seed: int = 0
) -> Float[Tensor, "*batch"]:
    """Monte Carlo ``q``-quantile of :func:`matched_null_samples` (0-dim tensor when unbatched)."""
    return _quantile(matched_null_samples(cov, v, n, seed), q)


# ----------------------------------------------------------------------------- permutation null


def permutation_null_samples(
    group_a: Float[Tensor, "n_a *batch d_model"],
    group_b: Float[Tensor, "n_b *batch d_model"],
    reference: Vectors,
    n_perm: int,
    seed: int = 0,
) -> Float[Tensor, "*batch n_perm"]:
    """``cos(mean(perm_a) - mean(perm_b), reference)`` under ``n_perm`` random relabellings of the pooled rows.

    Rows (axis 0) are prompts; trailing axes (e.g. ``[layer, d_model]``) are kept. A permutation whose
    mean difference is exactly zero gives cosine 0.0.
    """
    a, b = group_a.to(torch.float64), group_b.to(torch.float64)
    if a.shape[1:] != b.shape[1:] or a.shape[0] < 1 or b.shape[0] < 1:
        raise ShapeError(
            f"groups must be non-empty [n, ..., d] with matching trailing shapes, got {list(a.shape)} "
            f"and {list(b.shape)}; read both groups at the same sites."
        )
    if reference.shape[-1] != a.shape[-1]:
        raise ShapeError(
            f"reference has d={reference.shape[-1]} but the groups have d={a.shape[-1]}; "
            f"use a direction read at the same site as the activations."
        )
    ref_unit = _unit64(reference, "reference")  # validate before the permutations
    pool = torch.cat([a, b]).flatten(1)  # [N, rest]
    n_a, total = a.shape[0], pool.sum(dim=0)
    gen, out = _generator(seed, pool.device), []
    chunk = max(1, _CHUNK_ELEMENTS // max(pool.shape[0], pool.shape[1]))
    for start in range(0, n_perm, chunk):
        m = min(chunk, n_perm - start)
        order = torch.rand(m, pool.shape[0], generator=gen, device=pool.device).argsort(dim=-1)
        mask = torch.zeros(m, pool.shape[0], dtype=torch.float64, device=pool.device).scatter_(1, order[:, :n_a], 1.0)
        sum_a = mask @ pool
        diff = (sum_a / n_a - (total - sum_a) / b.shape[0]).reshape(m, *a.shape[1:])
        out.append(cosine(diff, ref_unit))
    samples = torch.cat(out) if out else pool.new_zeros((0, *a.shape[1:-1]))
    return samples.movedim(0, -1)


def empirical_pvalue(samples: Float[Tensor, "*batch n"], observed: Number | PerRow) -> Float[Tensor, "*batch"]:
    """One-sided Monte Carlo p-value ``(1 + #{samples >= observed}) / (n + 1)`` along the last axis."""
    s = torch.as_tensor(samples, dtype=torch.float64)
    obs = torch.as_tensor(observed, dtype=torch.float64, device=s.device).unsqueeze(-1)
    return ((s >= obs).sum(dim=-1) + 1.0) / (s.shape[-1] + 1.0)


# ------------------------------------------------------------------------------------- summaries


def mean_std(values: ArrayLike) -> tuple[float, float]:
    """``(mean, std)`` with ``std`` at ddof=1; ``std`` is NaN for a single value."""
    arr = _vector_1d(values, "values")
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else math.nan)


def format_mean_std(mean: float, std: float, digits: int = 2, percent: bool = False) -> str:
    """``"0.43 ± 0.05"``; ``percent=True`` scales both by 100: ``"43.00 ± 5.00%"``. A NaN std prints ``± n/a``."""
    scale, unit = (100.0, "%") if percent else (1.0, "")
    spread = "n/a" if math.isnan(std) else f"{std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {spread}{unit}"


def bootstrap_ci(values: ArrayLike, level: float = 0.95, n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap ``(lo, hi)`` interval for the mean at confidence ``level``."""
    arr = torch.from_numpy(_vector_1d(values, "values"))
    if arr.numel() < 2:
        raise ShapeError("bootstrap_ci needs at least 2 values (one value has no spread); run more seeds.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}; pass e.g. 0.95.")
    gen, n, means = _generator(seed), arr.numel(), []
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, chunk):
        means.append(arr[torch.randint(0, n, (min(chunk, n_boot - start), n), generator=gen)].mean(dim=-1))
    means = torch.cat(means)
    return float(_quantile(means, (1 - level) / 2)), float(_quantile(means, (1 + level) / 2))


def paired_differences(a: ArrayLike, b: ArrayLike) -> dict:
    """Differences ``a - b`` of paired runs: ``{"mean", "std" (ddof=1), "n", "values" (list of floats)}``."""
    x, y = _vector_1d(a, "a"), _vector_1d(b, "b")
    if x.shape != y.shape:
        raise ShapeError(f"paired values need equal lengths, got {x.size} and {y.size}; pair runs by seed.")
    diff = x - y
    mean, std = mean_std(diff)
    return {"mean": mean, "std": std, "n": int(diff.size), "values": [float(v) for v in diff]}


def describe(values: ArrayLike, level: float = 0.95, n_boot: int = 10000, seed: int = 0) -> dict:
    """A summary across seeds: ``{"mean", "std" (ddof=1), "n", "ci": [lo, hi], "values"}``.

    ``ci`` is the percentile bootstrap interval of the mean (seeded: the same values give the same
    interval); ``None`` with fewer than 2 values. NaN values are dropped first. With a handful of seeds
    the percentile bootstrap is too narrow rather than too wide (its coverage at n = 5 is nearer 85%
    than 95% for normal data): read it as a lower bound on the uncertainty.
    """
    arr = np.asarray([float(v) for v in np.asarray(values, dtype=np.float64).ravel() if v == v], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "n": 0, "ci": None, "values": []}
    mean, std = mean_std(arr)
    ci = list(bootstrap_ci(arr, level, n_boot, seed)) if arr.size > 1 else None
    return {"mean": mean, "std": None if math.isnan(std) else std, "n": int(arr.size), "ci": ci,
            "values": [float(v) for v in arr]}  # fmt: skip


def paired_test(a: ArrayLike, b: ArrayLike, level: float = 0.95, seed: int = 0) -> dict:
    """Paired per-seed differences ``a - b``: :func:`describe` of them plus two-sided p-values.

    ``p_signflip``: the exact sign-flip permutation test (all ``2^n`` sign patterns for n <= 16, else
    100000 seeded draws): no normality assumed, but it cannot go below ``2 / 2^n`` (0.0625 at n = 5).
    ``p_t``: the paired t-test (assumes normal differences).
    """
    x, y = _vector_1d(a, "a"), _vector_1d(b, "b")
    if x.shape != y.shape:
        raise ShapeError(f"paired values need equal lengths, got {x.size} and {y.size}; pair runs by seed.")
    diff = x - y
    out = describe(diff, level=level, seed=seed)
    n = diff.size
    if n < 2:
        return {**out, "p_signflip": None, "p_t": None}
    observed = abs(diff.mean())
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(100000, n))
    flipped = np.abs((signs * diff).mean(1))
    p_flip = float((flipped >= observed - 1e-12 * max(1.0, observed)).mean())
    sd = diff.std(ddof=1)
    if sd > 1e-12 * max(1.0, observed):
        p_t = float(scipy.stats.ttest_1samp(diff, 0.0).pvalue)
    else:  # identical differences: no spread to test against
        p_t = 0.0 if observed > 0 else 1.0
    return {**out, "p_signflip": p_flip, "p_t": p_t}


def spearman(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Spearman ``(rho, two-sided p-value)`` via scipy; ``(nan, nan)`` if either input is constant."""
    xa, ya = _vector_1d(x, "x"), _vector_1d(y, "y")
    if xa.shape != ya.shape or xa.size < 2:
        raise ShapeError(f"spearman needs two equal-length inputs of >= 2 values, got {xa.size} and {ya.size}.")
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return math.nan, math.nan
    res = scipy.stats.spearmanr(xa, ya)
    return float(res.statistic), float(res.pvalue)


def fraction_above(values: ArrayLike, threshold: Number | ArrayLike) -> float:
    """Fraction of ``values`` strictly above ``threshold`` (which broadcasts against ``values``), as a float."""
    if isinstance(values, Tensor):
        v = values.detach().to(torch.float64)
    else:
        v = torch.from_numpy(np.asarray(values, dtype=np.float64))
    if v.numel() == 0:
        raise ShapeError("fraction_above got no values; pass at least one.")
    if not torch.isfinite(v).all():
        raise NonFiniteError("fraction_above: values contain NaN or inf; drop the failed draws first.")
    return float((v > torch.as_tensor(threshold, dtype=torch.float64, device=v.device)).double().mean())
