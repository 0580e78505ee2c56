"""save_hf: a fine-tuned TransformerBridge written as a Hugging Face folder that transformers and our specs load."""

import os

import pytest
import torch
from hf_fixtures import save_tiny

from reversion_lens.errors import SpecError
from reversion_lens.hf_export import hf_state_dict, save_hf
from reversion_lens.specs import parse_spec

os.environ["HF_HUB_OFFLINE"] = "1"

ARCHS = [("gpt2", {}), ("neox", {}), ("llama", {}), ("llama", {"tied": False})]
TEXT = "the cat sat on the mat"


def boot(folder):
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_transformers(str(folder), device="cpu")


def fine_tune(model, steps: int = 3, seed: int = 0) -> torch.Tensor:
    """A few AdamW steps on random tokens (every weight moves); returns the tokens."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, int(model.cfg.d_vocab), (2, 9), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        model(toks, return_type="loss").backward()
        opt.step()
    return toks


def hf_logits(folder, toks):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(toks).logits


@pytest.mark.parametrize("arch,kw", ARCHS, ids=["gpt2", "neox", "llama-gqa-tied", "llama-gqa-untied"])
def test_fine_tuned_bridge_exports_to_a_folder_transformers_and_specs_load(tmp_path, arch, kw):
    from transformers import AutoTokenizer

    src = save_tiny(arch, tmp_path / "src", **kw)
    model = boot(src)
    with torch.no_grad():
        before = model(model.to_tokens(TEXT))
    toks = fine_tune(model)
    model.eval()
    with torch.no_grad():
        ours = model(toks)
        assert (model(model.to_tokens(TEXT)) - before).abs().max() > 1e-2  # training moved the model
    out = save_hf(model, tmp_path / "out")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    torch.testing.assert_close(hf_logits(out, toks), ours, atol=1e-5, rtol=0)
    spec = parse_spec(out)
    assert spec.kind == "hf_dir" and spec.signature() == parse_spec(src).signature()
    with torch.no_grad():
        torch.testing.assert_close(spec.load()(toks), ours, atol=1e-5, rtol=0)
    # the tokenizer behaves as the source's (not as TransformerLens's add_bos_token reload)
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == AutoTokenizer.from_pretrained(src)(TEXT).input_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folders left


def test_neox_needs_the_fused_qkv_rebuilt_from_the_trained_split(tmp_path):
    """TL4_GUIDE's recipe (strip ._original_component) exports GPT-NeoX's stale fused query_key_value."""
    from transformers import AutoModelForCausalLM

    model = boot(save_tiny("neox", tmp_path / "src"))
    toks = fine_tune(model)
    naive = {}
    for k, v in model.original_model.state_dict().items():
        naive.setdefault(k.replace("._original_component", ""), v)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "src", attn_implementation="eager").eval()
    hf.load_state_dict({k: naive[k] for k in hf.state_dict()}, strict=True)
    _, state = hf_state_dict(model)
    with torch.no_grad():
        ours = model(toks)
        assert (hf(toks).logits - ours).abs().max() > 1e-2
        hf.load_state_dict(state, strict=True)
        torch.testing.assert_close(hf(toks).logits, ours, atol=1e-5, rtol=0)


def test_tied_embeddings_that_drifted_apart_are_exported_untied(tmp_path):
    import json

    model = boot(save_tiny("llama", tmp_path / "src", tied=True))
    head = model.original_model.lm_head
    with torch.no_grad():  # the output embedding stops sharing the input embedding's tensor and moves
        head.weight = torch.nn.Parameter(head.weight.detach().clone() + 0.1)
    toks = model.to_tokens(TEXT)
    with torch.no_grad():
        ours = model(toks)
    out = save_hf(model, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(hf_logits(out, toks), ours, atol=1e-5, rtol=0)


def test_native_bridge_points_to_save_native(tmp_path):
    from conftest import make_native

    with pytest.raises(SpecError, match="save_native"):
        save_hf(make_native(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_folder_and_failed_writes_leave_nothing_half_written(tmp_path, monkeypatch):
    model = boot(save_tiny("gpt2", tmp_path / "src"))
    out = save_hf(model, tmp_path / "out")
    with pytest.raises(SpecError, match="already exists"):
        save_hf(model, out)
    before = (out / "model.safetensors").read_bytes()
    fine_tune(model)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, out, overwrite=True, tokenizer=model.tokenizer)
    assert (out / "model.safetensors").read_bytes() == before  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    monkeypatch.undo()
    save_hf(model, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before


def test_check_refuses_weights_that_do_not_reproduce_the_bridge(tmp_path):
    model = boot(save_tiny("llama", tmp_path / "src"))
    model.add_hook("blocks.1.hook_resid_post", lambda x, hook: x * 0.5, is_permanent=True)
    with pytest.raises(RuntimeError, match="do not reproduce the bridge"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model.reset_hooks(including_permanent=True)
    save_hf(model, tmp_path / "out")
