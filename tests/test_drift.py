"""drift_metrics: the per-layer metrics by hand, and their translation, scale and sign properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_helpers import _stats_pair

from reversion_lens.directions import Direction, mean_difference
from reversion_lens.drift import drift_metrics
from reversion_lens.errors import NonFiniteError

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def test_drift_metrics_by_hand():
    base, aligned = _stats_pair()
    v = mean_difference(base, aligned)
    current = aligned.mean + 0.25 * (base.mean - aligned.mean) + 0.1
    rows = drift_metrics(current, aligned, base, v, step=3)
    for i, row in enumerate(rows):
        d = current[i] - aligned.mean[i]
        assert row["step"] == 3 and row["layer"] == i
        assert row["cos"] == pytest.approx(float(d @ v.vectors[i].double() / d.norm()), abs=1e-6)
        assert row["projection"] == pytest.approx(float(d @ v.vectors[i].double()), abs=1e-5)
        assert row["drift_norm"] == pytest.approx(float(d.norm()), abs=1e-5)
        dist = (base.mean[i] - aligned.mean[i]).norm()
        assert row["reversion_ratio"] == pytest.approx(float(d @ v.vectors[i].double() / dist), abs=1e-6)
    back_at_base = drift_metrics(base, aligned, base, v)
    assert all(
        r["reversion_ratio"] == pytest.approx(1.0, abs=1e-6) and r["cos"] == pytest.approx(1.0, abs=1e-6)
        for r in back_at_base
    )
    with pytest.raises(NonFiniteError, match="diverged"):
        drift_metrics(current * float("nan"), aligned, base, v)


@st.composite
def drift_setups(draw):
    d = draw(st.integers(2, 12))
    n_layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ref, base, cur = (torch.randn(n_layers, d, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    v = Direction.from_vectors(torch.randn(n_layers, d, generator=g, dtype=torch.float64))
    return cur, ref, base, v


def _metrics(cur, ref, base, v):
    rows = drift_metrics(cur, ref, base, v)
    return {k: np.array([r[k] for r in rows]) for k in ("cos", "projection", "drift_norm", "reversion_ratio")}


@PROPERTY
@given(drift_setups(), st.floats(-50, 50), st.floats(1e-2, 1e2))
def test_drift_metrics_translation_scale_and_sign(setup, shift, scale):
    cur, ref, base, v = setup
    m = _metrics(cur, ref, base, v)
    assert (np.abs(m["cos"]) <= 1 + 1e-12).all() and (m["drift_norm"] >= 0).all()
    # the same offset added to every state changes nothing
    t = _metrics(cur + shift, ref + shift, base + shift, v)
    for k in m:
        np.testing.assert_allclose(t[k], m[k], rtol=1e-6, atol=1e-6 * (1 + abs(shift)))
    # scaling all activations scales projection and norm, not cos or the reversion ratio
    s = _metrics(cur * scale, ref * scale, base * scale, v)
    np.testing.assert_allclose(s["cos"], m["cos"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["reversion_ratio"], m["reversion_ratio"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["projection"], scale * m["projection"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["drift_norm"], scale * m["drift_norm"], rtol=1e-9, atol=1e-12)
    # flipping the direction flips the signed metrics only
    f = _metrics(cur, ref, base, Direction.from_vectors(-v.vectors.double()))
    np.testing.assert_allclose(f["cos"], -m["cos"], atol=1e-6)
    np.testing.assert_allclose(f["drift_norm"], m["drift_norm"], atol=1e-12)
    # moving a fraction of the way back to the base along v_rev = mean_difference: cos 1, ratio = fraction
    v_rev = Direction.from_vectors(base - ref)
    frac = 0.37
    back = _metrics(ref + frac * (base - ref), ref, base, v_rev)
    np.testing.assert_allclose(back["cos"], 1.0, atol=1e-6)
    np.testing.assert_allclose(back["reversion_ratio"], frac, atol=1e-6)
