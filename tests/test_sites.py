"""The site -> hook-name map: residual sites, layer-norm sites, and what each site reads."""

import pytest
import torch
from conftest import make_native, random_seqs
from hf_fixtures import perturbed_copy, save_tiny
from shared_helpers import hook_count

import reversion_lens as rl
from reversion_lens import sites
from reversion_lens.directions import Direction
from reversion_lens.errors import ConfigError, DirectionError, ShapeError, SiteError
from reversion_lens.interventions import block
from reversion_lens.pipeline import ExperimentConfig
from reversion_lens.tracking import DriftTracker

D = 32


@pytest.fixture(scope="module")
def bridges(tmp_path_factory):
    """Random GPT-2, GPT-NeoX and Llama bridges (perturbed: norm weights far from 1) and their folders."""
    from transformer_lens import TransformerBridge

    root = tmp_path_factory.mktemp("sites_hf")
    out = {}
    for arch in ("gpt2", "neox", "llama"):
        folder = perturbed_copy(save_tiny(arch, root / f"{arch}0"), root / arch, scale=0.5)
        out[arch] = (TransformerBridge.boot_transformers(str(folder), device="cpu"), folder)
    return out


def test_sites_map_and_errors(tiny_model):
    assert sites.hook_name(tiny_model, "resid_post", 1) == "blocks.1.hook_resid_post"
    assert sites.hook_name(tiny_model, "attn_out", -1) == "blocks.2.hook_attn_out"
    assert sites.residual_write_hooks(tiny_model, 0) == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_post",
    ]
    with pytest.raises(SiteError, match="unknown site 'resid_middle'"):
        sites.hook_name(tiny_model, "resid_middle", 0)
    with pytest.raises(SiteError, match="out of range.*3 layers"):
        sites.check_layers(tiny_model, [3])
    with pytest.raises(SiteError, match="duplicate"):
        sites.check_layers(tiny_model, [1, 1])
    assert sites.check_layers(tiny_model, None) == (0, 1, 2)


def test_norm_site_names(tiny_model):
    assert sites.SITES[:5] == ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")  # unchanged
    assert set(sites.NORM_SITES) <= set(sites.SITES) and sites.BRANCH_SITES == frozenset(sites.NORM_SITES)
    assert sites.hook_name(tiny_model, "ln1_in", 0) == "blocks.0.ln1.hook_in"
    assert sites.hook_name(tiny_model, "ln2_out", -1) == "blocks.2.ln2.hook_out"
    assert sites.hook_name(tiny_model, "ln_final_out", -1) == "ln_final.hook_out"
    assert sites.hook_names(tiny_model, "ln1_out") == [f"blocks.{i}.ln1.hook_out" for i in range(3)]
    with pytest.raises(SiteError, match=r"last layer \(2\) only.*layers=\[2\]"):
        sites.hook_name(tiny_model, "ln_final_in", 0)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_norm_sites_exist_on_every_family(arch, bridges):
    model, _ = bridges[arch]
    L = int(model.cfg.n_layers)
    for site in sites.NORM_SITES:
        for layer in [L - 1] if site.startswith("ln_final") else range(L):
            assert sites.hook_name(model, site, layer) in model.hook_dict


def _cache(model, toks):
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    return cache


@pytest.mark.parametrize("arch", ["native", "gpt2", "neox", "llama"])
def test_norm_sites_read_what_they_say(arch, bridges):
    """ln*_in hold the residual values named in the sites table; residual_stats reads every norm site."""
    model = make_native() if arch == "native" else bridges[arch][0]
    seqs = random_seqs(5, vocab=int(model.cfg.d_vocab), lo=4, seed=2)
    probes = rl.ProbeSet.from_tokens(seqs, padding_side="left")
    L = int(model.cfg.n_layers)
    cache = _cache(model, probes.tokens[:1, -len(seqs[0]) :])
    parallel = arch == "neox"
    for layer in range(L):
        pre = cache[f"blocks.{layer}.hook_resid_pre"]
        torch.testing.assert_close(cache[f"blocks.{layer}.ln1.hook_in"], pre, atol=0, rtol=0)
        mid = pre if parallel else pre + cache[f"blocks.{layer}.hook_attn_out"]
        torch.testing.assert_close(cache[f"blocks.{layer}.ln2.hook_in"], mid, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_in"], cache[f"blocks.{L - 1}.hook_resid_post"], atol=0, rtol=0)
    one_at_a_time = [_cache(model, torch.tensor([s])) for s in seqs]
    for site in sites.NORM_SITES:
        layers = [L - 1] if site.startswith("ln_final") else None
        st = rl.residual_stats(model, probes, site=site, layers=layers, keep_per_prompt=True)
        for i, layer in enumerate(st.layers):
            name = sites.hook_name(model, site, layer)
            want = torch.stack([c[name][0, -1] for c in one_at_a_time])
            torch.testing.assert_close(st.per_prompt[:, i], want, atol=1e-5, rtol=0)


def test_norm_outputs_equal_hugging_face_norm_outputs(bridges):
    """ln1_out / ln2_out / ln_final_out are the outputs of Llama's input_layernorm, post_attention_layernorm, norm."""
    from transformers import AutoModelForCausalLM

    model, folder = bridges["llama"]
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    seen = {}
    handles = [
        mod.register_forward_hook(lambda m, i, o, key=key: seen.__setitem__(key, o.detach()))
        for key, mod in [("ln1_out", hf.model.layers[1].input_layernorm),
                         ("ln2_out", hf.model.layers[1].post_attention_layernorm), ("ln_final_out", hf.model.norm)]
    ]  # fmt: skip
    toks = torch.randint(4, int(model.cfg.d_vocab), (2, 6), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            hf(input_ids=toks)
    finally:
        for h in handles:
            h.remove()
    cache = _cache(model, toks)
    for site, value in seen.items():
        layer = int(model.cfg.n_layers) - 1 if site == "ln_final_out" else 1
        torch.testing.assert_close(cache[sites.hook_name(model, site, layer)], value, atol=1e-5, rtol=0)
        assert (value - cache[f"blocks.{layer}.hook_resid_pre"]).abs().max() > 1e-2  # not a residual value


def test_unknown_site_or_layer(tiny_model, world):
    probes, base, aligned, v = world
    with pytest.raises(SiteError, match="unknown site 'resid'; choose one of resid_pre"):
        rl.residual_stats(tiny_model, probes, site="resid")
    with pytest.raises(SiteError, match=r"layer 3 is out of range for a model with 3 layers; use 0..2"):
        rl.residual_stats(tiny_model, probes, layers=[0, 3])
    with pytest.raises(SiteError, match="not an integer"):
        rl.residual_stats(tiny_model, probes, layers=[1.0])
    with pytest.raises(DirectionError, match=r"covers layers \(0, 1, 2\), not layer 5"):
        v[5]
    with pytest.raises(DirectionError, match=r"layers \[7\] are not covered"):
        v.select([0, 7])
    with pytest.raises(ConfigError, match="unknown site 'resid'; choose one of"):
        ExperimentConfig(site="resid")
    far = Direction.from_vectors(torch.randn(2, D, generator=torch.Generator().manual_seed(0)), layers=[0, 5])
    with pytest.raises(ShapeError, match="covers layer 5 but the model has only 3 layers"):
        block(tiny_model, far, "grad")
    with pytest.raises(SiteError, match="out of range"):
        DriftTracker(probes, far, base.mean[[0, 1]], aligned.mean[[0, 1]])(0, tiny_model)
    assert hook_count(tiny_model) == 0
