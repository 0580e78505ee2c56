"""k-dimensional v_rev: the subspace estimator, its alignment and isotropic null, the arm grammar, the runner wiring."""

import math
import types

import pytest
import torch

from reversion_lens.activations import ResidStats
from reversion_lens.directions import (
    Direction,
    Subspace,
    as_subspace,
    mean_difference,
    random_subspace,
    reversion_subspace,
)
from reversion_lens.drift import drift_metrics, subspace_alignment, subspace_metrics, subspace_null_quantile
from reversion_lens.errors import ConfigError, DirectionError, ShapeError
from reversion_lens.pipeline.arms import Arm

LAYERS, N, D = (0, 2, 5), 40, 16


def stats_pair(seed: int = 0) -> tuple[ResidStats, ResidStats]:
    """Paired per-prompt vectors: base = aligned + a shared shift + prompt-specific displacements of rank 3."""
    g = torch.Generator().manual_seed(seed)
    aligned = torch.randn(N, len(LAYERS), D, generator=g, dtype=torch.float64)
    shift = 2.0 * torch.randn(len(LAYERS), D, generator=g, dtype=torch.float64)
    axes = torch.randn(len(LAYERS), 3, D, generator=g, dtype=torch.float64)
    coef = torch.randn(N, len(LAYERS), 3, generator=g, dtype=torch.float64) * torch.tensor(
        [3.0, 2.0, 1.0], dtype=torch.float64
    )
    base = aligned + shift + torch.einsum("nlk,lkd->nld", coef, axes)

    def make(x: torch.Tensor) -> ResidStats:
        return ResidStats(x.sum(0), N, LAYERS, "resid_post", per_prompt=x.float())

    return make(base), make(aligned)


def test_reversion_subspace_leads_with_v_rev_is_orthonormal_nested_and_spans_the_displacements():
    base, aligned = stats_pair()
    v = mean_difference(base, aligned)
    s4 = reversion_subspace(base, aligned, 4)
    assert s4.k == 4 and s4.layers == LAYERS and s4.d_model == D
    torch.testing.assert_close(s4.basis[:, 0], v.vectors, atol=1e-6, rtol=0)  # row 0 is v_rev itself
    eye = torch.eye(4, dtype=torch.float64).expand(len(LAYERS), 4, 4)
    torch.testing.assert_close(s4.basis.double() @ s4.basis.double().transpose(1, 2), eye, atol=1e-6, rtol=0)
    # rows 1..k-1 are the top principal axes of the displacements projected off v_rev (an eigen-check)
    disp = (base.per_prompt - aligned.per_prompt).double().transpose(0, 1)
    vv = v.vectors.double()
    orth = disp - (disp @ vv[:, :, None]) * vv[:, None, :]
    for i in range(len(LAYERS)):
        cov = orth[i].T @ orth[i]
        _evals, evecs = torch.linalg.eigh(cov)
        top = evecs[:, -3:]  # the three directions of the rank-3 displacements
        inside = (s4.basis[i, 1:].double() @ top).norm(dim=1)
        assert (inside > 1 - 1e-6).all()
    s2 = reversion_subspace(base, aligned, 2)
    torch.testing.assert_close(s2.basis, s4.truncate(2).basis, atol=1e-5, rtol=0)  # nested in k
    assert torch.equal(reversion_subspace(base, aligned, 1).basis[:, 0], v.vectors)


def test_reversion_subspace_errors():
    base, aligned = stats_pair()
    with pytest.raises(DirectionError, match="rank"):
        reversion_subspace(base, aligned, 6)  # only 3 independent orthogonal displacement axes exist
    no_pp = ResidStats(base.sum, N, LAYERS, "resid_post")
    with pytest.raises(ShapeError, match="per-prompt"):
        reversion_subspace(no_pp, aligned, 2)
    with pytest.raises(DirectionError, match="positive"):
        reversion_subspace(base, aligned, 0)
    with pytest.raises(DirectionError, match="orthonormal"):
        Subspace(torch.ones(3, 2, D), torch.ones(3), LAYERS)


def test_subspace_value_object_select_save_load_and_direction_view(tmp_path):
    base, aligned = stats_pair()
    s = reversion_subspace(base, aligned, 3)
    sel = s.select([5, 0])
    assert sel.layers == (5, 0) and torch.equal(sel[5], s[5]) and torch.equal(sel.basis[1], s[0])
    back = Subspace.load(s.save(tmp_path / "s.safetensors"))
    assert torch.equal(back.basis, s.basis) and back.layers == s.layers and back.provenance["k"] == 3
    assert isinstance(s.direction, Direction) and torch.equal(s.direction.vectors, s.vectors)
    one = as_subspace(mean_difference(base, aligned))
    assert one.k == 1 and torch.equal(one.basis[:, 0], mean_difference(base, aligned).vectors)
    with pytest.raises(DirectionError, match="covers"):
        s.select([1])
    r = random_subspace(D, LAYERS, 4, seed=3)
    assert r.k == 4 and torch.equal(r.basis, random_subspace(D, LAYERS, 4, seed=3).basis)
    assert not torch.equal(r.basis, random_subspace(D, LAYERS, 4, seed=4).basis)


def test_subspace_alignment_math_and_k1_equals_abs_cos():
    base, aligned = stats_pair()
    s = reversion_subspace(base, aligned, 3)
    g = torch.Generator().manual_seed(1)
    drift = torch.randn(len(LAYERS), D, generator=g, dtype=torch.float64)
    inside = torch.einsum("lkd,lk->ld", s.basis.double(), torch.randn(len(LAYERS), 3, generator=g, dtype=torch.float64))
    torch.testing.assert_close(
        subspace_alignment(inside, s.basis), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0
    )
    ortho = drift - torch.einsum("lkd,lk->ld", s.basis.double(), torch.einsum("lkd,ld->lk", s.basis.double(), drift))
    assert subspace_alignment(ortho, s.basis).abs().max() < 1e-6
    assert torch.equal(subspace_alignment(torch.zeros(3, D), s.basis), torch.zeros(3, dtype=torch.float64))
    cur = aligned.mean + drift
    v = mean_difference(base, aligned)
    cos = torch.tensor([r["cos"] for r in drift_metrics(cur, aligned, base, v)], dtype=torch.float64)
    rows = subspace_metrics(cur, aligned, v)
    torch.testing.assert_close(
        torch.tensor([r["alignment"] for r in rows], dtype=torch.float64), cos.abs(), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(torch.tensor([r["lead_cos"] for r in rows], dtype=torch.float64), cos, atol=1e-6, rtol=0)
    rows3 = subspace_metrics(cur, aligned, s, step=7)
    assert [r["layer"] for r in rows3] == list(LAYERS) and all(r["k"] == 3 and r["step"] == 7 for r in rows3)
    assert all(math.isclose(r["energy_share"], r["alignment"] ** 2) for r in rows3)


@pytest.mark.parametrize("d,k", [(64, 1), (64, 4), (576, 8)])
def test_subspace_null_quantile_against_monte_carlo(d, k):
    """The squared alignment of a uniform drift with a fixed k-subspace is Beta(k/2, (d-k)/2)."""
    g = torch.Generator().manual_seed(0)
    n = 40000
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    a = u[:, :k].norm(dim=1) / u.norm(dim=1)  # S = the first k axes (isotropy: any S is the same)
    p99 = subspace_null_quantile(0.99, d, k)
    share = float((a > p99).double().mean())
    se = math.sqrt(0.01 * 0.99 / n)
    assert abs(share - 0.01) < 4 * se
    assert abs(float((a**2).mean()) - k / d) < 4 * float((a**2).std()) / math.sqrt(n)
    with pytest.raises(ShapeError):
        subspace_null_quantile(0.99, d, d)


def test_arm_grammar_for_subspaces():
    a = Arm.parse("grad-cum:v_rev4@0,2")
    assert (a.mode, a.direction, a.k, a.layers) == ("grad-cum", "v_rev", 4, (0, 2))
    assert Arm.parse("update-cum:random8").k == 8 and Arm.parse("update-cum:random8").direction == "random"
    assert Arm.parse("grad:v_rev").k == 1
    with pytest.raises(ConfigError, match="subspace mode"):
        Arm.parse("grad:v_rev4")  # grad blocks one vector per layer
    with pytest.raises(ConfigError, match="unknown arm"):
        Arm.parse("grad-cum:v_rev0")
    with pytest.raises(ConfigError, match="unknown arm"):
        Arm.parse("grad-cum:vrev4")


def test_build_interventions_hands_subspace_modes_a_k_dim_v_rev():
    from conftest import make_native

    from reversion_lens.pipeline import ExperimentConfig
    from reversion_lens.pipeline.runner import build_interventions

    model = make_native(n_layers=6, d_model=D, d_vocab=40)
    base, aligned = stats_pair()
    v = mean_difference(base, aligned)
    config = ExperimentConfig(params={"preset": "tiny"}, seeds=(0,), arms=("none", "grad-cum:v_rev3"), steps=2,
                              track_steps=(1,), eval_steps=(0,))  # fmt: skip
    stats = {"base": base, "aligned": aligned}
    hist = types.SimpleNamespace(probes=lambda: None, load=lambda name: None)  # these modes need neither
    (iv,) = build_interventions(Arm.parse("grad-cum:v_rev3@2,5"), model, v, stats, hist, config, seed=0)
    assert iv.subspace.k == 3 and iv.layers == (2, 5)
    torch.testing.assert_close(iv.subspace.basis, reversion_subspace(base, aligned, 3).select([2, 5]).basis)
    (rnd,) = build_interventions(Arm.parse("update-cum:random2"), model, v, stats, hist, config, seed=0)
    assert rnd.subspace.k == 2 and rnd.subspace.provenance["method"] == "random"
