"""Tests for reversion_lens.stats: geometry invariants, null calibration, summaries, errors, determinism."""

import contextlib
import math

import jaxtyping
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from reversion_lens import stats
from reversion_lens.errors import DirectionError, NonFiniteError, ShapeError

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)  # same examples every run


def _cdf(c, d):
    a = (d - 1) / 2
    return scipy.stats.beta.cdf((1 + np.asarray(c)) / 2, a, a)


def _quantile_se(q, d, n):
    """Asymptotic SE of the empirical q-quantile: sqrt(q(1-q)/n) / f(c_q), with f the exact null density."""
    a = (d - 1) / 2
    c_q = stats.isotropic_quantile(q, d)
    density = 0.5 * scipy.stats.beta.pdf((1 + c_q) / 2, a, a)
    return math.sqrt(q * (1 - q) / n) / density


@contextlib.contextmanager
def _shape_error(fragment):
    """Our ShapeError naming ``fragment``, or jaxtyping's own error when runtime shape checks are on."""
    with pytest.raises((ShapeError, jaxtyping.TypeCheckError)) as info:
        yield
    if info.type is ShapeError:
        assert fragment in str(info.value)


@st.composite
def vector_pairs(draw, min_norm=1e-2):
    d = draw(st.integers(2, 16))
    elems = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
    a = draw(arrays(np.float64, d, elements=elems))
    b = draw(arrays(np.float64, d, elements=elems))
    assume(np.linalg.norm(a) > min_norm and np.linalg.norm(b) > min_norm)
    return torch.from_numpy(a), torch.from_numpy(b)


# ------------------------------------------------------------------------------------- geometry


@PROPERTY
@given(vector_pairs(), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_cosine_scale_invariant_and_odd(pair, s, t):
    a, b = pair
    c = stats.cosine(a, b)
    assert -1.0 <= float(c) <= 1.0
    assert float(stats.cosine(s * a, t * b)) == pytest.approx(float(c), abs=1e-9)
    assert float(stats.cosine(-a, b)) == pytest.approx(-float(c), abs=1e-12)
    assert float(stats.cosine(a, -b)) == pytest.approx(-float(c), abs=1e-12)


@PROPERTY
@given(vector_pairs(), st.floats(-100, 100), st.floats(1e-3, 1e3))
def test_projection_linear_in_x_and_invariant_to_scaling_v(pair, s, t):
    x, v = pair
    y = torch.roll(x, 1) + 0.5
    lhs = stats.projection(s * x + y, t * v)
    rhs = s * stats.projection(x, v) + stats.projection(y, v)
    assert float(lhs) == pytest.approx(float(rhs), abs=1e-9 * (1 + abs(float(rhs))) + 1e-9 * abs(s) * float(x.norm()))


@PROPERTY
@given(vector_pairs())
def test_remove_component_zero_and_idempotent(pair):
    x, v = pair
    r = stats.remove_component(x, v)
    assert abs(float(stats.projection(r, v))) < 1e-6
    torch.testing.assert_close(stats.remove_component(r, v), r, atol=1e-9, rtol=0)
    # only the v-component changed
    torch.testing.assert_close(x - r, stats.projection(x, v) * stats.normalize(v), atol=1e-9, rtol=0)


def test_geometry_broadcasts_per_layer_and_keeps_dtype():
    gen = torch.Generator().manual_seed(0)
    drift = torch.randn(5, 32, generator=gen, dtype=torch.float32)  # [layer, d_model]
    v = torch.randn(32, generator=gen, dtype=torch.float32)
    c = stats.cosine(drift, v)
    assert c.shape == (5,) and c.dtype == torch.float32
    for layer in range(5):
        expected = torch.nn.functional.cosine_similarity(drift[layer].double(), v.double(), dim=0)
        assert float(c[layer]) == pytest.approx(float(expected), abs=1e-6)
    unit = stats.normalize(drift)
    assert unit.dtype == torch.float32
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    assert stats.normalize(drift.T, dim=0).shape == (32, 5)
    torch.testing.assert_close(stats.normalize(drift.T, dim=0).T, unit, atol=1e-7, rtol=0)
    r = stats.remove_component(drift, torch.randn(5, 32, generator=gen))  # one direction per layer
    assert r.shape == (5, 32) and r.dtype == torch.float32


def test_zero_drift_has_cosine_zero():
    drift = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    c = stats.cosine(drift, torch.tensor([1.0, 1.0, 0.0]))
    assert c.tolist() == pytest.approx([0.0, 1 / math.sqrt(2)], abs=1e-12)


@pytest.mark.parametrize(
    "call, where",
    [
        (lambda: stats.normalize(torch.tensor([[1.0, 2.0], [0.0, 0.0]])), "zero norm in row 1"),
        (lambda: stats.normalize(torch.zeros(4)), "zero norm in the vector"),
        (lambda: stats.normalize(torch.tensor([[1.0, float("nan")], [1.0, 1.0]])), "NaN or inf values in row 0"),
        (lambda: stats.cosine(torch.ones(3, 4), torch.zeros(3, 4)), "zero norm in row 0"),
        (
            lambda: stats.cosine(torch.tensor([[1.0, 1.0], [1.0, math.inf]]), torch.ones(2)),
            "NaN or inf values in row 1",
        ),
        (lambda: stats.projection(torch.ones(4), torch.full((4,), 1e-14)), "zero norm"),
        (lambda: stats.remove_component(torch.ones(2, 2, 4), torch.zeros(2, 2, 4)), "row (0, 0)"),
        (lambda: stats.random_direction_samples(torch.zeros(8), 10), "zero norm"),
        (lambda: stats.matched_null_samples(torch.eye(4), torch.zeros(4), 10), "zero norm"),
        (lambda: stats.permutation_null_samples(torch.ones(3, 4), torch.zeros(3, 4), torch.zeros(4), 5), "zero norm"),
    ],
)
def test_zero_and_nonfinite_directions_raise_helpful_errors(call, where):
    with pytest.raises(DirectionError) as info:
        call()
    message = str(info.value)
    assert where in message
    assert ("must be nonzero" in message) or ("drop the non-finite" in message)  # the fix is named


# --------------------------------------------------------------------------------- isotropic null


def test_exact_isotropic_quantile_values():
    assert stats.isotropic_quantile(0.99, 768) == pytest.approx(0.083879, abs=1e-6)
    assert stats.isotropic_quantile(0.5, 64) == pytest.approx(0.0, abs=1e-12)
    assert stats.isotropic_quantile(0.01, 64) == pytest.approx(-stats.isotropic_quantile(0.99, 64), abs=1e-12)
    # d = 3: C is uniform on [-1, 1] (Archimedes)
    assert stats.isotropic_quantile(0.9, 3) == pytest.approx(0.8, abs=1e-12)
    qs = torch.tensor([0.9, 0.99, 0.999])
    back = stats.isotropic_pvalue(stats.isotropic_quantile(qs, 128), 128)
    assert isinstance(back, torch.Tensor)
    torch.testing.assert_close(back, 1 - qs.double(), atol=1e-10, rtol=0)
    with pytest.raises(ShapeError, match="d >= 2"):
        stats.isotropic_quantile(0.99, 1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        stats.isotropic_quantile(1.5, 64)


@pytest.mark.parametrize("d", [64, 768])
def test_exact_p99_matches_monte_carlo_within_3_se(d):
    n, q = 40000, 0.99
    samples = stats.isotropic_null_samples(d, n, seed=d)
    exact = stats.isotropic_quantile(q, d)
    mc = float(torch.quantile(samples, q))
    assert abs(mc - exact) < 3 * _quantile_se(q, d, n)
    # distribution-free version: the count below the exact quantile is Binomial(n, q)
    below = int((samples <= exact).sum())
    assert abs(below - n * q) < 3 * math.sqrt(n * q * (1 - q))


def test_exact_p99_false_positive_rate_on_random_isotropic_drifts():
    d, n = 768, 20000
    v = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos = stats.random_direction_samples(v, n, seed=2)  # v against random drift directions
    rate = stats.fraction_above(cos, stats.isotropic_quantile(0.99, d))
    assert 0.007 <= rate <= 0.013


def test_isotropic_pvalue_uniform_under_null():
    d = 64
    p = stats.isotropic_pvalue(stats.isotropic_null_samples(d, 5000, seed=3), d)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert scipy.stats.kstest(p.numpy(), "uniform").pvalue > 1e-3
    assert stats.isotropic_pvalue(-1.0, d) == pytest.approx(1.0)
    assert stats.isotropic_pvalue(1.0, d) == pytest.approx(0.0)


def test_random_direction_samples_follow_exact_null_per_layer():
    d = 48
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(4))
    samples = stats.random_direction_samples(x, 4000, seed=5)
    assert samples.shape == (3, 4000) and samples.dtype == torch.float64
    for row in samples:
        assert scipy.stats.kstest(row.numpy(), lambda c: _cdf(c, d)).pvalue > 1e-3


# ------------------------------------------------------------------------------ matched null


def test_covariance_matches_numpy_and_needs_two_rows():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float32)
    cov = stats.covariance(x)
    assert cov.dtype == torch.float64
    np.testing.assert_allclose(cov.numpy(), np.cov(x.double().numpy(), rowvar=False, ddof=1), atol=1e-12)
    per_layer = stats.covariance(torch.stack([x, 2 * x]))  # [layer, n, d]
    np.testing.assert_allclose(per_layer[1].numpy(), 4 * cov.numpy(), atol=1e-12)
    with pytest.raises(ShapeError, match="n >= 2"):
        stats.covariance(torch.ones(1, 6))


def test_matched_null_with_identity_cov_agrees_with_isotropic():
    d, n, q = 64, 20000, 0.99
    v = torch.randn(d, generator=torch.Generator().manual_seed(7))
    got = stats.matched_quantile(torch.eye(d), v, q=q, n=n, seed=8)
    assert got.shape == ()
    assert abs(float(got) - stats.isotropic_quantile(q, d)) < 3 * _quantile_se(q, d, n)


def test_matched_null_anisotropic_along_v_is_wider_and_batches_per_layer():
    d = 64
    v = stats.normalize(torch.randn(d, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    aligned = torch.eye(d, dtype=torch.float64) + 50 * torch.outer(v, v)
    covs = torch.stack([torch.eye(d, dtype=torch.float64), aligned])  # [layer, d, d]
    vs = torch.stack([v, v])  # [layer, d]
    p99 = stats.matched_quantile(covs, vs, n=20000, seed=10)
    assert p99.shape == (2,)
    iso = stats.isotropic_quantile(0.99, d)
    assert abs(float(p99[0]) - iso) < 3 * _quantile_se(0.99, d, 20000)
    assert float(p99[1]) > 3 * iso
    # batched layer 1 agrees with its own unbatched computation up to Monte Carlo error
    alone = stats.matched_quantile(aligned, v, n=20000, seed=11)
    assert abs(float(alone) - float(p99[1])) < 0.03


def test_matched_null_handles_singular_and_slightly_negative_covariance():
    d = 16
    gen = torch.Generator().manual_seed(12)
    u, v = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    rank1 = torch.outer(u, u)  # every drift is ±u
    samples = stats.matched_null_samples(rank1, v, 500, seed=0)
    expected = abs(float(stats.cosine(u, v)))
    torch.testing.assert_close(samples.abs(), torch.full((500,), expected, dtype=torch.float64), atol=1e-10, rtol=0)
    assert 0.3 < float((samples > 0).double().mean()) < 0.7
    psd_zero = torch.diag(torch.tensor([1.0, 2.0] + [0.0] * (d - 2), dtype=torch.float64)) - 1e-12 * torch.eye(d)
    s = stats.matched_null_samples(psd_zero, v, 500, seed=0)
    assert torch.isfinite(s).all() and float(s.abs().max()) <= 1.0
    with pytest.raises(ShapeError, match="cov is zero"):
        stats.matched_null_samples(torch.zeros(d, d), v, 10)
    with _shape_error("same d"):
        stats.matched_null_samples(torch.eye(d), torch.ones(d + 1), 10)
    with pytest.raises(NonFiniteError):
        stats.matched_null_samples(torch.full((d, d), float("nan")), v, 10)


# -------------------------------------------------------------------------- permutation null


def test_permutation_null_shapes_center_and_detects_real_difference():
    gen = torch.Generator().manual_seed(13)
    shift = torch.zeros(2, 32, dtype=torch.float64)
    shift[:, 0] = 3.0
    a = torch.randn(25, 2, 32, generator=gen, dtype=torch.float64) + shift  # [prompt, layer, d_model]
    b = torch.randn(30, 2, 32, generator=gen, dtype=torch.float64)
    reference = a.mean(0) - b.mean(0)
    null = stats.permutation_null_samples(a, b, reference, n_perm=2000, seed=14)
    assert null.shape == (2, 2000) and float(null.abs().max()) <= 1.0
    # the null is symmetric about 0 (swapping labels negates the difference)
    assert abs(float(null.mean())) < 4 * float(null.std()) / math.sqrt(2000)
    observed = stats.cosine(a.mean(0) - b.mean(0), reference)
    torch.testing.assert_close(observed, torch.ones(2, dtype=torch.float64), atol=1e-12, rtol=0)
    pvals = stats.empirical_pvalue(null, observed)
    assert pvals.tolist() == pytest.approx([1 / 2001, 1 / 2001])
    with _shape_error("same site"):
        stats.permutation_null_samples(a, b, torch.ones(31), 10)


# ------------------------------------------------------------------------------------ summaries


def test_mean_std_format_and_paired_differences():
    mean, std = stats.mean_std([0.40, 0.45, 0.44])
    assert mean == pytest.approx(0.43, abs=1e-12)
    assert std == pytest.approx(np.std([0.40, 0.45, 0.44], ddof=1), abs=1e-12)
    assert math.isnan(stats.mean_std(torch.tensor([0.5]))[1])
    assert stats.format_mean_std(0.4312, 0.0512) == "0.43 ± 0.05"
    assert stats.format_mean_std(0.4312, 0.0512, digits=1, percent=True) == "43.1 ± 5.1%"
    assert stats.format_mean_std(0.5, math.nan) == "0.50 ± n/a"
    diff = stats.paired_differences(np.array([1.0, 2.0, 4.0]), [0.5, 1.0, 1.0])
    assert diff["values"] == [0.5, 1.0, 3.0] and diff["n"] == 3
    assert diff["mean"] == pytest.approx(1.5) and diff["std"] == pytest.approx(np.std([0.5, 1, 3], ddof=1))
    with pytest.raises(ShapeError, match="equal lengths"):
        stats.paired_differences([1.0, 2.0], [1.0])
    with pytest.raises(NonFiniteError, match="index 1"):
        stats.mean_std([1.0, float("nan")])
    assert stats.fraction_above([0.1, 0.2, 0.3, 0.4], 0.2) == pytest.approx(0.5)
    assert stats.fraction_above(torch.tensor([[0.1, 0.9], [0.5, 0.2]]), torch.tensor([0.5, 0.1])) == pytest.approx(0.5)


def test_bootstrap_ci_coverage_is_near_nominal():
    rng = np.random.default_rng(15)
    covered = 0
    for i in range(300):
        data = rng.normal(1.0, 2.0, size=20)
        lo, hi = stats.bootstrap_ci(data, level=0.95, n_boot=2000, seed=i)
        assert lo < data.mean() < hi
        covered += lo <= 1.0 <= hi
    assert 0.90 <= covered / 300 <= 0.98
    with pytest.raises(ShapeError, match="at least 2"):
        stats.bootstrap_ci([1.0])


def test_spearman_matches_scipy():
    rng = np.random.default_rng(16)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    rho, p = stats.spearman(torch.from_numpy(x), list(y))
    ref = scipy.stats.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9)
    assert all(math.isnan(v) for v in stats.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


@PROPERTY
@given(st.lists(st.integers(-50, 50), min_size=4, max_size=30, unique=True), st.integers(0, 2**31))
def test_spearman_invariant_under_monotone_transforms(ints, seed):
    x = np.array(ints, dtype=np.float64) / 10
    y = np.random.default_rng(seed).permutation(ints) + np.array(ints, dtype=np.float64)  # exact ties only
    assume(np.ptp(y) > 0)
    rho, _ = stats.spearman(x, y)
    assert stats.spearman(np.exp(x), y)[0] == pytest.approx(rho, abs=1e-9)
    assert stats.spearman(x**3, 2 * y + 7)[0] == pytest.approx(rho, abs=1e-9)
    assert stats.spearman(-x, y)[0] == pytest.approx(-rho, abs=1e-9)


# -------------------------------------------------------------------------------- determinism


_DATA = torch.randn(14, 8, generator=torch.Generator().manual_seed(17), dtype=torch.float64)


@pytest.mark.parametrize(
    "draw",
    [
        lambda seed: stats.isotropic_null_samples(32, 300, seed=seed),
        lambda seed: stats.random_direction_samples(torch.arange(1.0, 9.0), 300, seed=seed),
        lambda seed: stats.matched_null_samples(torch.eye(8) + 1, torch.arange(1.0, 9.0), 300, seed=seed),
        lambda seed: stats.permutation_null_samples(_DATA[:6], _DATA[6:], torch.ones(8), 300, seed=seed),
        lambda seed: torch.tensor(stats.bootstrap_ci(_DATA[:, 0], n_boot=500, seed=seed)),
    ],
)
def test_same_seed_same_samples(draw):
    torch.testing.assert_close(draw(0), draw(0), atol=0, rtol=0)
    assert not torch.equal(draw(0), draw(1))
