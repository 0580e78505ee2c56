"""DriftTracker: rows equal the drift metrics computed by hand; mode, hooks and interventions left as found."""

import math

import pytest
import torch
from conftest import make_native, random_seqs

import reversion_lens as rl
from reversion_lens.directions import mean_difference
from reversion_lens.errors import NonFiniteError, ShapeError
from reversion_lens.interventions import block
from reversion_lens.tracking import TRACK_COLUMNS, DriftTracker, load_means
from reversion_lens.training import Batch, OptimConfig, finetune

L, D, V = 3, 32, 40


def hook_count(model):
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(
        len(hp.fwd_hooks) + len(hp.bwd_hooks) + len(hp._forward_hooks) + len(hp._backward_hooks) for hp in points
    )


@pytest.fixture(scope="module")
def world():
    seqs = random_seqs(7, vocab=V, seed=5)
    probes = rl.ProbeSet.from_tokens(seqs)
    ref = rl.residual_stats(make_native(n_layers=L, d_model=D, d_vocab=V, seed=0), probes)
    base = rl.residual_stats(make_native(n_layers=L, d_model=D, d_vocab=V, seed=4), probes)
    return seqs, probes, ref, base, mean_difference(base, ref)


def naive_means(model, seqs, layers):
    """One unpadded prompt at a time, run_with_cache, last token, resid_post: the oracle."""
    rows = []
    with torch.no_grad():
        for s in seqs:
            _, cache = model.run_with_cache(torch.tensor([s]))
            rows.append(torch.stack([cache[f"blocks.{l}.hook_resid_post"][0, -1] for l in layers]).double())
    return torch.stack(rows).mean(0)


def test_rows_match_metrics_by_hand(world):
    seqs, probes, ref, base, v = world
    v02 = v.select([0, 2])
    current = make_native(n_layers=L, d_model=D, d_vocab=V, seed=11)
    tracker = DriftTracker(probes, v02, ref, base, keep_means=True)
    rows = tracker(7, current)
    assert [r["layer"] for r in rows] == [0, 2] and all(r["step"] == 7 for r in rows)
    assert list(tracker.frame().columns) == list(TRACK_COLUMNS) and len(tracker.frame()) == 2
    cur = naive_means(current, seqs, [0, 2])
    for i, (row, layer) in enumerate(zip(rows, [0, 2])):
        drift = cur[i] - ref.mean[layer].double()
        u = v[layer].double()
        proj = float(drift @ u)
        norm = float(drift.norm())
        dist = float((base.mean[layer] - ref.mean[layer]).double().norm())
        assert row["projection"] == pytest.approx(proj, abs=1e-4)
        assert row["drift_norm"] == pytest.approx(norm, abs=1e-4)
        assert row["cos"] == pytest.approx(proj / norm, abs=1e-5)
        assert row["reversion_ratio"] == pytest.approx(proj / dist, abs=1e-5)
        torch.testing.assert_close(tracker.means[7][i].double(), cur[i], atol=1e-5, rtol=0)
    # the reference itself has zero drift; the base is at reversion ratio 1 along v_rev
    at_ref = DriftTracker(probes, v, ref, base)(0, make_native(n_layers=L, d_model=D, d_vocab=V, seed=0))
    assert all(r["drift_norm"] < 1e-5 and r["cos"] == 0.0 for r in at_ref)
    at_base = DriftTracker(probes, v, ref, base)(0, make_native(n_layers=L, d_model=D, d_vocab=V, seed=4))
    assert all(
        r["reversion_ratio"] == pytest.approx(1.0, abs=1e-5) and r["cos"] == pytest.approx(1.0, abs=1e-5)
        for r in at_base
    )


def test_restores_modes_leaves_no_hooks_and_pauses_interventions(world):
    _seqs, probes, ref, base, v = world
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=11)
    model.train()
    model.blocks[2].eval()
    modes = [m.training for m in model.modules()]
    tracker = DriftTracker(probes, v, ref, base)
    bare = tracker(1, model)
    assert [m.training for m in model.modules()] == modes and hook_count(model) == 0
    with block(model, v, "clamp", reference=ref):
        paused_rows = tracker(1, model)
        clamped = DriftTracker(probes, v, ref, base, with_interventions=True)(1, model)
        assert hook_count(model) == len(v.layers) * 2  # the clamp's own hooks, nothing more
    assert paused_rows == bare  # the bare weights were measured (and the step's rows replaced, not added)
    assert len(tracker.records) == L
    assert all(abs(r["projection"]) < 1e-4 for r in clamped)  # the clamp pins the v component to the reference
    assert hook_count(model) == 0


def test_nonfinite_names_step_and_layer(world):
    _, probes, ref, base, v = world
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=11)
    model.blocks[1].hook_out.add_hook(lambda x, hook: x * float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 12.*layer 1"):
        DriftTracker(probes, v, ref, base)(12, model)
    model.reset_hooks()


def test_means_file_and_state_roundtrip(world, tmp_path):
    _, probes, ref, base, v = world
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=11)
    tracker = DriftTracker(probes, v, ref, base, keep_means=True)
    for step in (0, 5, 20):
        tracker(step, model)
    tracker.save_means(tmp_path / "m.safetensors")
    means = load_means(tmp_path / "m.safetensors")
    assert list(means) == [0, 5, 20] and all(m.shape == (L, D) for m in means.values())
    assert torch.equal(means[5], tracker.means[5])
    tensors, info = tracker.state_dict()
    fresh = DriftTracker(probes, v, ref, base, keep_means=True)
    fresh.load_state_dict(tensors, info)
    assert fresh.records == tracker.records and sorted(fresh.means) == [0, 5, 20]
    with pytest.raises(ShapeError, match="keep_means"):
        DriftTracker(probes, v, ref, base).save_means(tmp_path / "x.safetensors")
    with pytest.raises(ShapeError, match="site"):
        DriftTracker(probes, v, ref, base, site="resid_pre")


def test_inside_finetune(world):
    _, probes, ref, base, v = world
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)

    class Data:
        def batch(self, step):
            t = torch.randint(1, V, (4, 10), generator=torch.Generator().manual_seed(step))
            return Batch(t, torch.ones_like(t), torch.ones_like(t))

    tracker = DriftTracker(probes, v, ref, base)
    result = finetune(
        model, Data(), 5, optim=OptimConfig(lr=1e-2), tracker=tracker, track_steps=(0, 1, 5), progress=False
    )
    assert sorted({r["step"] for r in result.records}) == [0, 1, 5] and result.records == tracker.records
    first = [r for r in result.records if r["step"] == 0]
    assert all(r["drift_norm"] < 1e-5 for r in first)  # step 0 is the reference itself
    last = [r for r in result.records if r["step"] == 5]
    assert all(r["drift_norm"] > 1e-3 and math.isfinite(r["cos"]) for r in last)
    assert model.training
