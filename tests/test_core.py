"""Probe sets, streaming statistics, drift metrics, histories (sites: test_sites.py; directions: test_directions.py)."""

import json

import pytest
import torch
from conftest import make_native, random_seqs

import reversion_lens as rl
from reversion_lens.directions import mean_difference, random_direction
from reversion_lens.drift import drift_metrics
from reversion_lens.errors import (
    IncompatibleCheckpointsError,
    NonFiniteError,
    ProbeError,
    ResultsFormatError,
)
from reversion_lens.history import Checkpoint, History
from reversion_lens.models import save_native


def naive_last_token(model, seqs, site="resid_post"):
    """One prompt at a time, run_with_cache, the last token: the oracle for the streaming statistics."""
    out = []
    for s in seqs:
        _, cache = model.run_with_cache(torch.tensor([s]))
        out.append(torch.stack([cache[f"blocks.{l}.hook_{site}"][0, -1] for l in range(model.cfg.n_layers)]))
    return torch.stack(out)  # [prompt, layer, d]


# ---------------------------------------------------------------- probes
def test_probe_validation():
    with pytest.raises(ProbeError, match="empty"):
        rl.ProbeSet.from_tokens([])
    with pytest.raises(ProbeError, match="no tokens"):
        rl.ProbeSet.from_tokens([[1, 2], []])
    left = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(ProbeError, match="left-padded.*attention_mask"):
        rl.ProbeSet.from_tokens(left, pad_id=0)
    with pytest.raises(ProbeError, match="holes"):
        rl.ProbeSet(torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1]]))
    p = rl.ProbeSet.from_tokens([[1, 2, 3]])
    with pytest.raises(ProbeError, match="outside the model's vocabulary"):
        p.check_vocab(3)


def test_read_weights_last_mean_span():
    p = rl.ProbeSet.from_tokens([[1, 2, 3], [4, 5]], padding_side="left")
    assert p.last_positions().tolist() == [2, 2]
    m = rl.ProbeSet.from_tokens([[1, 2, 3], [4, 5]], padding_side="right", read="mean")
    assert torch.allclose(m.read_weights(), torch.tensor([[1 / 3] * 3, [0.5, 0.5, 0]]))
    s = rl.ProbeSet.from_tokens([[1, 2, 3], [4, 5]], padding_side="left", read="span", span=(-2, None))
    assert torch.allclose(s.read_weights(), torch.tensor([[0, 0.5, 0.5], [0, 0.5, 0.5]]))
    # the hash ignores padding side and is sensitive to content
    assert p.hash() == rl.ProbeSet.from_tokens([[1, 2, 3], [4, 5]]).hash()
    assert p.hash() != rl.ProbeSet.from_tokens([[1, 2, 3], [4, 6]]).hash()


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_equals_one_at_a_time(side):
    model = make_native()
    seqs = random_seqs(9)
    probes = rl.ProbeSet.from_tokens(seqs, padding_side=side)
    stats = rl.residual_stats(model, probes, batch_size=4, keep_per_prompt=True)
    oracle = naive_last_token(model, seqs)
    torch.testing.assert_close(stats.per_prompt, oracle, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.mean, oracle.double().mean(0), atol=1e-5, rtol=0)
    assert stats.count == 9 and stats.sum.dtype == torch.float64


def test_rotary_left_padding_equals_unpadded():
    model = make_native(positional_embedding_type="rotary")
    seqs = random_seqs(6, seed=3)
    stats = rl.residual_stats(model, rl.ProbeSet.from_tokens(seqs, padding_side="left"), keep_per_prompt=True)
    torch.testing.assert_close(stats.per_prompt, naive_last_token(model, seqs), atol=1e-5, rtol=0)


def test_sites_layers_span_and_second_moments(tiny_model):
    seqs = random_seqs(7, seed=1)
    probes = rl.ProbeSet.from_tokens(seqs, read="span", span=(-3, None))
    st = rl.residual_stats(tiny_model, probes, site="attn_out", layers=[1], second_moments=True, keep_per_prompt=True)
    vecs = []
    for s in seqs:
        _, c = tiny_model.run_with_cache(torch.tensor([s]))
        vecs.append(c["blocks.1.hook_attn_out"][0, -3:].mean(0))
    vecs = torch.stack(vecs).double()
    torch.testing.assert_close(st.mean[0], vecs.mean(0), atol=1e-5, rtol=0)
    cov = torch.cov(vecs.T)
    torch.testing.assert_close(st.covariance()[0], cov, atol=1e-5, rtol=0)
    assert st.layers == (1,) and st.site == "attn_out"


def test_stats_stop_early_and_leave_no_hooks(tiny_model):
    calls = []
    tiny_model.blocks[2].hook_out.add_hook(lambda x, hook: calls.append(1))
    rl.residual_stats(tiny_model, rl.ProbeSet.from_tokens(random_seqs(4)), layers=[0, 1])
    assert calls == []  # layer 2 never ran: the pass stopped after layer 1
    tiny_model.reset_hooks()
    n_hooks = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in tiny_model.hook_dict.values())
    assert n_hooks == 0


def test_nonfinite_activations_raise(tiny_model):
    tiny_model.blocks[1].hook_out.add_hook(lambda x, hook: x * float("nan"))
    with pytest.raises(NonFiniteError, match="layer 1"):
        rl.residual_stats(tiny_model, rl.ProbeSet.from_tokens(random_seqs(3)))
    tiny_model.reset_hooks()


def test_stats_save_load_roundtrip(tmp_path, tiny_model):
    st = rl.residual_stats(tiny_model, rl.ProbeSet.from_tokens(random_seqs(5)), second_moments=True, meta={"checkpoint": "x"})
    st.save(tmp_path / "s.safetensors")
    back = rl.ResidStats.load(tmp_path / "s.safetensors")
    assert torch.equal(back.sum, st.sum) and torch.equal(back.second, st.second)
    assert back.layers == st.layers and back.meta["checkpoint"] == "x" and back.meta["probes"]["n"] == 5
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "s.safetensors").read_bytes()[:100])
    with pytest.raises(ResultsFormatError, match="corrupted or truncated"):
        rl.ResidStats.load(tmp_path / "bad.safetensors")


def test_same_seed_same_numbers():
    seqs = random_seqs(5)
    a = rl.residual_stats(make_native(seed=4), rl.ProbeSet.from_tokens(seqs))
    b = rl.residual_stats(make_native(seed=4), rl.ProbeSet.from_tokens(seqs))
    assert torch.equal(a.sum, b.sum)


# ---------------------------------------------------------------- directions and drift
def _stats_pair():
    seqs = random_seqs(8)
    probes = rl.ProbeSet.from_tokens(seqs)
    base = rl.residual_stats(make_native(seed=1), probes, keep_per_prompt=True, meta={"checkpoint": "base"})
    aligned = rl.residual_stats(make_native(seed=2), probes, keep_per_prompt=True, meta={"checkpoint": "aligned"})
    return base, aligned


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
    assert all(r["reversion_ratio"] == pytest.approx(1.0, abs=1e-6) and r["cos"] == pytest.approx(1.0, abs=1e-6) for r in back_at_base)
    with pytest.raises(NonFiniteError, match="diverged"):
        drift_metrics(current * float("nan"), aligned, base, v)


def test_vocab_readout(tiny_model):
    v = random_direction(32, [2], seed=0)
    table = rl.directions.vocab_readout(v, tiny_model, k=3)
    scores = v.vectors[0] @ tiny_model.W_U.detach()
    top = table[(table.side == "top")].sort_values("rank")
    assert top.token_id.tolist() == scores.topk(3).indices.tolist()
    assert top.score.tolist() == pytest.approx(scores.topk(3).values.tolist(), abs=1e-5)


# ---------------------------------------------------------------- histories
def test_history_native_checkpoints(tmp_path):
    save_native(make_native(seed=1), tmp_path / "base")
    save_native(make_native(seed=2), tmp_path / "aligned")
    hist = History([Checkpoint.native("base", tmp_path / "base"), Checkpoint.native("aligned", tmp_path / "aligned")])
    probes = rl.ProbeSet.from_tokens(random_seqs(6))
    v = hist.direction(probes)
    expect = mean_difference(rl.residual_stats(make_native(seed=1), probes), rl.residual_stats(make_native(seed=2), probes))
    torch.testing.assert_close(v.vectors, expect.vectors, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "base" / "config.json").read_text())["d_model"] == 32


def test_history_incompatible_checkpoints(tmp_path):
    save_native(make_native(seed=1), tmp_path / "base")
    save_native(make_native(n_layers=2, seed=2), tmp_path / "aligned")
    with pytest.raises(IncompatibleCheckpointsError, match="'base' and 'aligned'.*n_layers 3 vs 2"):
        History([Checkpoint.native("base", tmp_path / "base"), Checkpoint.native("aligned", tmp_path / "aligned")])
    other_vocab = Checkpoint.in_memory("aligned", make_native(d_vocab=41))
    with pytest.raises(IncompatibleCheckpointsError, match="d_vocab 40 vs 41"):
        History([Checkpoint.in_memory("base", make_native()), other_vocab])


def test_public_verbs_load_lazily():
    from reversion_lens import interventions, tracking, training

    assert rl.block is interventions.block and rl.finetune is training.finetune
    assert rl.DriftTracker is tracking.DriftTracker
    with pytest.raises(AttributeError, match="no attribute 'blockk'"):
        rl.blockk
