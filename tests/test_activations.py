"""residual_stats and ResidStats: padding, sites and layers, early stop, non-finite values, files, determinism."""

import pytest
import torch
from conftest import make_native, random_seqs

import reversion_lens as rl
from reversion_lens.errors import NonFiniteError, ResultsFormatError
from reversion_lens.io import save_tensors

L, D, V = 3, 32, 40


def naive_last_token(model, seqs, site="resid_post"):
    """One prompt at a time, run_with_cache, the last token: the oracle for the streaming statistics."""
    out = []
    for s in seqs:
        _, cache = model.run_with_cache(torch.tensor([s]))
        out.append(torch.stack([cache[f"blocks.{l}.hook_{site}"][0, -1] for l in range(model.cfg.n_layers)]))
    return torch.stack(out)  # [prompt, layer, d]


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


def _nan_from_batch(model, layer, batch):
    """Make ``layer``'s output NaN from the ``batch``-th forward pass on (a run of bad batches)."""
    calls = {"n": 0}

    def hook(x, hook):
        calls["n"] += 1
        return x * float("nan") if calls["n"] > batch else x

    model.blocks[layer].hook_out.add_hook(hook)


def test_nonfinite_statistics_stop_naming_layer_and_batch_and_are_never_held(tmp_path):
    model = make_native()
    _nan_from_batch(model, layer=1, batch=1)
    probes = rl.ProbeSet.from_tokens(random_seqs(6, vocab=V))
    rows = ", ".join(map(str, list(probes.batches(3))[1].index.tolist()))  # grouped by length: its rows by index
    where = rf"layer 1 \(resid_post\) in probe batch 1 \(prompts {rows}\).*No statistics were written"
    with pytest.raises(NonFiniteError, match=where):
        rl.residual_stats(model, probes, batch_size=3)
    model.reset_hooks()
    # A ResidStats never holds NaN, so it can neither be saved nor used; a NaN file written by other code
    # cannot be loaded either.
    bad = torch.zeros(L, D, dtype=torch.float64)
    bad[2, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\(sum\) at site resid_post contain NaN or inf at layer\(s\) \[2\]"):
        rl.ResidStats(bad, 4, (0, 1, 2), "resid_post")
    pp = torch.zeros(4, L, D)
    pp[1, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"per-prompt vectors.*layer\(s\) \[0\]"):
        rl.ResidStats(torch.zeros(L, D, dtype=torch.float64), 4, (0, 1, 2), "resid_post", per_prompt=pp)
    meta = {"kind": "resid_stats", "count": 4, "layers": [0, 1, 2], "site": "resid_post"}
    save_tensors(tmp_path / "nan.safetensors", {"sum": bad}, meta)
    with pytest.raises(NonFiniteError, match="layer"):
        rl.ResidStats.load(tmp_path / "nan.safetensors")


def test_stats_save_load_roundtrip(tmp_path, tiny_model):
    st = rl.residual_stats(
        tiny_model, rl.ProbeSet.from_tokens(random_seqs(5)), second_moments=True, meta={"checkpoint": "x"}
    )
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
