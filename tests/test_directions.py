"""Directions: the value object and every estimator of ESTIMATORS."""

import math

import pytest
import torch
from conftest import make_native
from shared_helpers import _stats_pair, hook_count

import reversion_lens as rl
from reversion_lens.directions import (
    ESTIMATORS,
    Direction,
    chain,
    fit_logistic,
    logistic,
    mean_difference,
    principal_component,
    random_direction,
    uncentred_pca,
)
from reversion_lens.errors import DirectionError, ShapeError
from reversion_lens.interventions import block
from reversion_lens.tracking import DriftTracker

D = 32


def _synthetic(per_prompt, site="resid_post", probes_hash=None):
    """ResidStats built from per-prompt vectors [prompt, layer, d] (what residual_stats would hold)."""
    pp = per_prompt.float()
    meta = {"probes": {"hash": probes_hash}} if probes_hash else {}
    return rl.ResidStats(pp.double().sum(0), pp.shape[0], tuple(range(pp.shape[1])), site, per_prompt=pp, meta=meta)


def test_mean_difference_and_pc():
    base, aligned = _stats_pair()
    v = mean_difference(base, aligned)
    diff = base.mean - aligned.mean
    torch.testing.assert_close(v.vectors.double(), diff / diff.norm(dim=1, keepdim=True), atol=1e-6, rtol=0)
    torch.testing.assert_close(v.norms.double(), diff.norm(dim=1), atol=1e-5, rtol=1e-6)
    assert v.provenance["checkpoints"] == ["base", "aligned"]
    pc = principal_component(base, aligned)
    assert ((pc.vectors.double() * diff).sum(1) > 0).all()  # sign-aligned with the mean difference
    torch.testing.assert_close(pc.vectors.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    # a chain through one intermediate point: equal weights on the two unit steps
    mid = rl.ResidStats(aligned.sum + 0.5 * (base.sum - aligned.sum), base.count, base.layers, base.site)
    c = chain([base, mid, aligned])
    torch.testing.assert_close(c.vectors, v.vectors, atol=1e-5, rtol=0)


def test_direction_errors_and_roundtrip(tmp_path):
    with pytest.raises(DirectionError, match="zero norm at layer"):
        Direction.from_vectors(torch.zeros(2, 4))
    with pytest.raises(DirectionError, match="non-finite"):
        Direction.from_vectors(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(DirectionError, match="match layers"):
        Direction.from_vectors(torch.ones(2, 4), layers=[0])
    base, _ = _stats_pair()
    with pytest.raises(DirectionError, match="identical"):
        mean_difference(base, base)
    v = random_direction(32, [0, 2], seed=5)
    assert torch.equal(v.vectors, random_direction(32, [0, 2], seed=5).vectors)
    v.save(tmp_path / "d.safetensors")
    back = Direction.load(tmp_path / "d.safetensors")
    assert torch.equal(back.vectors, v.vectors) and back.layers == (0, 2)
    from safetensors.torch import load_file

    assert load_file(tmp_path / "d.safetensors")["v_rev"].shape == (2, 32)
    with pytest.raises(ShapeError, match="d_model 32 but the model has 16"):
        v.check_model(make_native(d_model=16))


# ---------------------------------------------------------------- PCA: centred and uncentred
def test_uncentred_pca_is_the_top_eigenvector_of_the_raw_differences():
    g = torch.Generator().manual_seed(0)
    # differences: a large shared offset along e0, a larger spread along e1 (centred PCA picks e1)
    d = torch.zeros(40, 1, 6, dtype=torch.float64)
    d[:, 0, 0] = 3.0 + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    d[:, 0, 1] = 2.0 * torch.randn(40, generator=g, dtype=torch.float64)
    d[:, 0, 2:] = 0.05 * torch.randn(40, 4, generator=g, dtype=torch.float64)
    second = 0.3 * torch.randn(40, 1, 6, generator=g, dtype=torch.float64)
    first, second = _synthetic(second + d), _synthetic(second)
    diffs = (first.per_prompt - second.per_prompt).double()[:, 0]
    _evals, evecs = torch.linalg.eigh(diffs.T @ diffs)  # the principal axis of {d_i} and {-d_i}
    top = evecs[:, -1] * torch.sign(evecs[:, -1] @ diffs.mean(0))
    u = uncentred_pca(first, second)
    torch.testing.assert_close(u.vectors[0].double(), top, atol=1e-5, rtol=0)
    assert u.vectors[0, 0] > 0.7  # the mean offset dominates
    pc = principal_component(first, second)
    assert abs(float(pc.vectors[0, 1])) > 0.99  # centred: the spread axis
    assert u.provenance["method"] == "uncentred_pca"
    torch.testing.assert_close(u.norms.double(), (first.mean - second.mean).norm(dim=1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- logistic regression
def _objective(x, y, w, b, l2):
    xc = x - x.mean(0)
    sigma2 = (xc**2).mean()
    s = 2 * y - 1
    return torch.nn.functional.softplus(-s * (x @ w + b)).mean() + 0.5 * l2 * sigma2 * (w @ w)


@pytest.mark.parametrize("n,d", [(30, 8), (12, 40)])
def test_fit_logistic_is_the_regularised_optimum(n, d):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    y = (torch.arange(n) % 2).double()
    x[y == 1, 0] += 1.0
    w, b = fit_logistic(x, y, l2=1e-2)
    w = w.clone().requires_grad_(True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    _objective(x, y, w, bt, 1e-2).backward()
    assert w.grad.abs().max() < 1e-8 and bt.grad.abs() < 1e-8  # the gradient vanishes: the optimum
    w2, b2 = fit_logistic(x, y, l2=1e-2)
    assert torch.equal(w.detach(), w2) and b == b2  # deterministic
    ws, _ = fit_logistic(100 * x, y, l2=1e-2)  # l2 is relative to the activations' scale
    torch.testing.assert_close(ws * 100, w.detach(), atol=1e-6, rtol=1e-6)


def test_logistic_direction_finds_the_separating_axis():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(50, 2, 16, generator=g)
    b = torch.randn(60, 2, 16, generator=g)
    a[:, :, 3] += 2.0  # layer 0 and 1: the sets differ along e3 ...
    a[:, 1, 5] += 20.0 * torch.randn(50, generator=g).sign()  # ... and layer 1 has a large, uninformative spread
    b[:, 1, 5] += 20.0 * torch.randn(60, generator=g).sign()
    v = logistic(_synthetic(a), _synthetic(b))
    assert (v.vectors[:, 3] > 0.8).all()  # toward the first set
    assert abs(float(v.vectors[1, 5])) < 0.1
    assert min(v.provenance["train_accuracy"]) > 0.8 and v.provenance["l2"] == 1e-2
    flipped = logistic(_synthetic(b), _synthetic(a))
    torch.testing.assert_close(flipped.vectors, -v.vectors, atol=1e-5, rtol=0)
    with pytest.raises(ShapeError, match="both classes"):
        fit_logistic(torch.randn(4, 3), torch.ones(4))
    with pytest.raises(ShapeError, match="l2 must be > 0"):
        fit_logistic(torch.randn(4, 3), torch.tensor([0.0, 1, 0, 1]), l2=0)


# ---------------------------------------------------------------- the registry and probe sets
def test_registry_and_contrasting_probe_sets():
    assert ESTIMATORS.names() == ["mean_difference", "principal_component", "uncentred_pca", "logistic"]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 3, 8, generator=g) + torch.linspace(0, 2, 8)
    b = torch.randn(10, 3, 8, generator=g)
    first, second = _synthetic(a, probes_hash="aaaa"), _synthetic(b, probes_hash="bbbb")
    for name, estimator in ((e.name, e.obj) for e in ESTIMATORS):
        with pytest.raises(ShapeError, match="different probe sets.*same_probes=False"):
            estimator(first, second)
        v = estimator(first, second, same_probes=False)
        assert v.provenance["method"] == name and v.layers == (0, 1, 2)
        assert v.provenance["probes"] == [{"hash": "aaaa"}, {"hash": "bbbb"}]
        assert ((v.vectors.double() * (first.mean - second.mean)).sum(1) > 0).all()
    with pytest.raises(ShapeError, match="pairs prompt i"):
        uncentred_pca(_synthetic(a[:9]), _synthetic(b))
    no_prompts = rl.ResidStats(first.sum, first.count, first.layers, first.site)
    with pytest.raises(ShapeError, match="keep_per_prompt=True"):
        logistic(no_prompts, second, same_probes=False)


def test_fit_logistic_reports_non_convergence():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    with pytest.raises(DirectionError, match="did not converge in 1 Newton steps"):
        fit_logistic(x, y, l2=1e-6, max_iter=1)
    w, b = fit_logistic(x, y, l2=1e-6)  # separable: a steep but finite optimum
    assert float(w[0]) > 5 and -b / float(w[0]) == pytest.approx(1.5, abs=1e-6)


def test_vocab_readout(tiny_model):
    v = random_direction(32, [2], seed=0)
    table = rl.directions.vocab_readout(v, tiny_model, k=3)
    scores = v.vectors[0] @ tiny_model.W_U.detach()
    top = table[(table.side == "top")].sort_values("rank")
    assert top.token_id.tolist() == scores.topk(3).indices.tolist()
    assert top.score.tolist() == pytest.approx(scores.topk(3).values.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Direction(torch.ones(D), torch.ones(1), (0,)), "non-empty 2-D tensor"),
        (lambda: Direction(torch.ones(2, 3, D), torch.ones(2), (0, 1)), "non-empty 2-D tensor"),
        (lambda: Direction(torch.ones(0, D), torch.ones(0), ()), "non-empty 2-D tensor"),
        (lambda: Direction.from_vectors(torch.ones(2, 3, D)), r"must be \[layer, d_model\]"),
        (lambda: Direction.from_vectors(torch.ones(3, D), layers=[0, 1]), "give one layer per row"),
        (
            lambda: Direction(torch.ones(2, D), torch.ones(2), (0, 1)),
            "unit norm; build them with Direction.from_vectors",
        ),
        (
            lambda: Direction.from_vectors(torch.cat([torch.ones(1, D), torch.zeros(1, D)])),
            r"zero norm at layer\(s\) \[1\]",
        ),
        (lambda: Direction.from_vectors(torch.full((2, D), float("inf"))), r"non-finite values at layer\(s\) \[0, 1\]"),
        (lambda: Direction.from_vectors(torch.tensor([[1.0, -math.inf]])), "non-finite.*Recompute"),
        (lambda: Direction.from_vectors(torch.eye(2, D), layers=[0, 0]), "distinct non-negative"),
        (lambda: Direction.from_vectors(torch.eye(2, D), layers=[-1, 0]), "use 3, not -1"),
        (lambda: Direction(torch.eye(2, D), torch.tensor([1.0, math.nan]), (0, 1)), "norms .* not finite"),
    ],
)
def test_bad_directions(make, fragment):
    with pytest.raises(DirectionError, match=fragment):
        make()


def test_direction_on_a_model_with_another_d_model(world):
    probes, base, aligned, v = world
    small = make_native(d_model=16)
    with pytest.raises(
        ShapeError, match="direction has d_model 32 but the model has 16; it was derived for another model"
    ):
        block(small, v, "grad")
    with pytest.raises(ShapeError, match="direction d_model 32.*measure the model the direction was derived for"):
        DriftTracker(probes, v, aligned, base)(3, small)
    with pytest.raises(ShapeError, match="d_model 32 vs 16"):
        mean_difference(base, rl.residual_stats(small, probes))
    assert hook_count(small) == 0
