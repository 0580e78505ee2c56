"""LoRA through the bridge: only adapters train, hooks still fire, gradient and update blocks hold, both exports."""

import os

import pytest
import torch
from hf_fixtures import save_tiny

from reversion_lens import lora
from reversion_lens.errors import ConfigError, SpecError
from reversion_lens.hf_export import save_hf

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_src")
    return {arch: save_tiny(arch, root / arch) for arch in ("gpt2", "neox", "llama")}


def boot(folder):
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_transformers(str(folder), device="cpu")


def tokens(model, seed=0, shape=(2, 9)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, int(model.cfg.d_vocab), shape, generator=g)


def unit(d, seed):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def train(model, toks, steps=3, lr=1e-2, after=None, hooks=()):
    opt = torch.optim.AdamW(lora.lora_parameters(model), lr=lr, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with model.hooks(bwd_hooks=list(hooks)):
            loss = model(toks, return_type="loss")
            loss.backward()
        opt.step()
        if after is not None:
            after()
        losses.append(loss.item())
    return losses


def grad_block_hooks(model, vs):
    """Hand-written backward hooks projecting v_l out of the gradient at resid_pre, attn_out, resid_post."""
    out = []
    for layer in range(model.cfg.n_layers):
        v = vs[layer]

        def project(g, hook, v=v):
            return (g - (g @ v)[..., None] * v,)

        out += [(f"blocks.{layer}.hook_{s}", project) for s in ("resid_pre", "attn_out", "resid_post")]
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_only_the_adapters_train_through_the_bridge_forward(src, arch):
    model = boot(src[arch])
    toks = tokens(model)
    with torch.no_grad():
        before = model(toks)
    labels = lora.apply_lora(model, r=4, alpha=8, seed=0)
    assert labels[:2] == ["blocks.0.attn.q", "blocks.0.attn.k"]
    assert len(labels) == model.cfg.n_layers * len(lora.lora_targets(model))
    with torch.no_grad():
        torch.testing.assert_close(model(toks), before, atol=0, rtol=0)  # B = 0 at the start
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.lora_parameters(model)} and len(trainable) == 2 * len(labels)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = [p.detach().clone() for p in lora.lora_parameters(model)]
    losses = train(model, toks)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(not torch.equal(a, p) for a, p in zip(adapters, lora.lora_parameters(model)))


def test_seed_fixes_the_adapters_and_leaves_the_global_rng_alone(src):
    a, b = boot(src["llama"]), boot(src["llama"])
    state = torch.random.get_rng_state()
    lora.apply_lora(a, r=2, alpha=4, target_modules=["o_proj", "mlp.out"], seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    lora.apply_lora(b, r=2, alpha=4, target_modules=["attn.o", "down_proj"], seed=3)
    assert (
        list(lora.lora_layers(a))
        == list(lora.lora_layers(b))
        == [f"blocks.{i}.{c}" for i in range(3) for c in ("attn.o", "mlp.out")]
    )
    assert all(torch.equal(p, q) for p, q in zip(lora.lora_parameters(a), lora.lora_parameters(b)))


def test_adapter_output_is_inside_the_hook_points(src):
    model = boot(src["llama"])
    lora.apply_lora(model, r=4, alpha=8, target_modules=["attn.o"], seed=0)
    layer = lora.lora_layers(model)["blocks.1.attn.o"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    _, cache = model.run_with_cache(tokens(model), names_filter=["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"])
    z = cache["blocks.1.attn.hook_z"]
    z = z.flatten(-2) if z.ndim == 4 else z
    W = layer.get_base_layer().weight + layer.get_delta_weight("default")
    torch.testing.assert_close(cache["blocks.1.hook_attn_out"], z @ W.T, atol=1e-5, rtol=0)
    assert (layer.get_delta_weight("default")).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_gradient_block_hooks_make_the_writers_B_gradients_orthogonal(src, arch):
    model = boot(src[arch])
    lora.apply_lora(model, r=4, alpha=8, seed=0)
    vs = torch.stack([unit(model.cfg.d_model, 10 + i) for i in range(model.cfg.n_layers)])
    writers = lora.lora_residual_writers(model)
    assert [w.label for w in writers] == [f"blocks.{i}.{c}.lora_B" for i in range(3) for c in ("attn.o", "mlp.out")]
    assert all(w.B.shape == (model.cfg.d_model, 4) and w.astuple()[3] == 0 for w in writers)
    toks = tokens(model)

    def worst(hooks):
        model.zero_grad()
        with model.hooks(bwd_hooks=hooks):
            model(toks, return_type="loss").backward()
        return max(float((vs[w.layer] @ w.B.grad).abs().max()) for w in writers)

    assert worst([]) > 1e-4  # without the block the writers' B gradients do have a v component
    assert worst(grad_block_hooks(model, vs)) < 1e-6


def test_project_lora_update_pins_vTB_under_adamw_where_the_gradient_block_does_not(src):
    model = boot(src["llama"])
    lora.apply_lora(model, r=4, alpha=8, seed=0)
    vs = torch.stack([unit(model.cfg.d_model, 20 + i) for i in range(model.cfg.n_layers)])
    hooks = grad_block_hooks(model, vs)
    toks = tokens(model)
    W0 = {
        w.label: lora.lora_layers(model)[w.label.removesuffix(".lora_B")].get_base_layer().weight.clone()
        for w in lora.lora_residual_writers(model)
    }

    def v_component():
        return max(float((vs[w.layer] @ w.B).abs().max()) for w in lora.lora_residual_writers(model))

    train(model, toks, steps=5, hooks=hooks)  # AdamW's per-element scaling rotates the projected gradient
    assert v_component() > 1e-4
    removed = lora.project_lora_update(model, vs)
    assert removed > 1e-4 and v_component() < 1e-6
    train(model, toks, steps=5, hooks=hooks, after=lambda: lora.project_lora_update(model, vs))
    assert v_component() < 1e-6
    for w in lora.lora_residual_writers(model):  # so the merged update is orthogonal to v as well
        layer = lora.lora_layers(model)[w.label.removesuffix(".lora_B")]
        delta = layer.get_base_layer().weight + layer.get_delta_weight("default") - W0[w.label]
        assert float((vs[w.layer] @ delta).abs().max()) < 1e-6 and float(delta.abs().max()) > 1e-4
    # another pinned value, and a {layer: v} mapping touching one layer only
    w = lora.lora_residual_writers(model)[0]
    c = torch.full((4,), 0.25)
    lora.project_lora_update(model, {0: vs[0] * 3}, pinned={w.label: c})
    torch.testing.assert_close(vs[0] @ w.B, c, atol=1e-6, rtol=0)
    assert float((vs[2] @ lora.lora_residual_writers(model)[-1].B).abs().max()) < 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_merged_export_and_in_place_merge_keep_the_lora_models_logits(src, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model = boot(src[arch])
    keys = sorted(model.state_dict())
    lora.apply_lora(model, r=4, alpha=8, seed=0)
    toks = tokens(model)
    train(model, toks)
    with torch.no_grad():
        ours = model(toks)
    out = save_hf(model, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(toks).logits, ours, atol=1e-5, rtol=0)
    assert lora.lora_layers(model)  # save_hf leaves the adapters in
    lora.merge_lora(model)
    assert not lora.lora_layers(model) and sorted(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(toks), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,targets", [("llama", None), ("gpt2", ["attn.o", "mlp.out", "mlp.in"])])
def test_adapter_folder_loads_with_peft_onto_the_plain_base_model(src, tmp_path, arch, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = boot(src[arch])
    lora.apply_lora(model, r=4, alpha=8, target_modules=targets, seed=0)
    toks = tokens(model)
    train(model, toks)
    with torch.no_grad():
        ours = model(toks)
    out = lora.save_lora_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(src[arch], attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(toks).logits, ours, atol=1e-5, rtol=0)


def test_bad_targets_repeats_and_split_qkv_adapters_are_clear_errors(src, tmp_path):
    model = boot(src["gpt2"])
    with pytest.raises(ConfigError, match="no LoRA target 'c_attn'.*attn.q / attn.k / attn.v"):
        lora.apply_lora(model, target_modules=["c_attn"])
    with pytest.raises(ConfigError, match="has no LoRA adapters"):
        lora.save_lora_adapter(model, tmp_path / "a")
    lora.apply_lora(model, target_modules=["attn.q", "c_proj"])
    assert sorted({k.split(".", 2)[2] for k in lora.lora_layers(model)}) == ["attn.o", "attn.q", "mlp.out"]
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        lora.apply_lora(model)
    with pytest.raises(SpecError, match="split q/k/v of a fused QKV"):
        lora.save_lora_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
