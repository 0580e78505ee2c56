"""Weight orthogonalization: the edited model equals hook ablation everywhere, and its edit is exportable."""

import pytest
import torch
from conftest import make_native
from hf_fixtures import perturbed_copy, save_tiny

from reversion_lens.directions import Direction, random_direction
from reversion_lens.errors import ConfigError, DirectionError
from reversion_lens.orthogonalize import embeddings_tied, orthogonalize, orthogonalized, residual_writers
from reversion_lens.steering import ablate_everywhere, steer

ARCHS = {"gpt2": ("gpt2", {}), "neox": ("neox", {}), "llama": ("llama", {}), "llama_untied": ("llama", {"tied": False})}


def _random_biases(folder, seed=2):
    """Give every bias a spread of 0.2 (initialised at zero, they would hardly test the bias edit)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Random folders with perturbed weights (final-norm weights far from 1) and biases; llama tied and untied."""
    root = tmp_path_factory.mktemp("orth_hf")
    return {k: _random_biases(perturbed_copy(save_tiny(arch, root / f"{k}0", **kw), root / k, scale=0.5))
            for k, (arch, kw) in ARCHS.items()}  # fmt: skip


def _model(kind, hf_dirs):
    if kind == "native":
        return make_native()
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_transformers(str(hf_dirs[kind]), device="cpu")


def _tokens(model, seed=0):
    return torch.randint(4, int(model.cfg.d_vocab), (2, 7), generator=torch.Generator().manual_seed(seed))


def _vector(model, seed=0):
    return torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(seed)) * 4


def _hf_state(bridge):
    """What an exporter of ``bridge.original_model.state_dict()`` writes: HF keys (TL4_GUIDE section 2), i.e.
    the keys with ``._original_component`` stripped (the first occurrence of each), restricted to the
    parameters of a plain Hugging Face model of the bridge's config."""
    from transformers import AutoModelForCausalLM

    names = AutoModelForCausalLM.from_config(bridge.original_model.config).state_dict().keys()
    out = {}
    for k, v in bridge.original_model.state_dict().items():
        out.setdefault(k.replace("._original_component", ""), v)
    return {k: out[k] for k in names}


def test_orthogonalized_math():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(8, generator=g)
    u = r / r.norm()
    for shape, axis in (((8, 5), 0), ((5, 8), 1), ((8,), 0), ((3, 8, 4), 1)):
        w = torch.randn(*shape, generator=g)
        out = orthogonalized(w, r, axis)
        assert torch.tensordot(u, out, dims=([0], [axis])).abs().max() < 1e-6
        torch.testing.assert_close(orthogonalized(out, r, axis), out, atol=1e-6, rtol=0)  # idempotent
        change = torch.tensordot(u, w, dims=([0], [axis]))  # only the r component was removed
        expect = w - torch.tensordot(u, change, dims=0).movedim(0, axis)
        torch.testing.assert_close(out, expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["native", "gpt2", "neox", "llama", "llama_untied"])
def test_orthogonalized_model_equals_hook_ablation(kind, hf_dirs):
    hooked, edited = _model(kind, hf_dirs), _model(kind, hf_dirs)
    toks, r = _tokens(hooked), _vector(hooked)
    was_tied = embeddings_tied(edited)
    assert was_tied == (kind in ("gpt2", "llama"))
    params_before = {id(p) for p in edited.parameters()}
    out = orthogonalize(edited, r)
    assert out is edited and not embeddings_tied(edited)
    with torch.no_grad():
        plain = hooked(toks)
        with ablate_everywhere(hooked, r):
            expect = hooked(toks)
        got = edited(toks)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)
    assert (got - plain).abs().max() > 1e-1
    u = r / r.norm()
    for w in residual_writers(edited):
        assert torch.tensordot(u, w.parameter.detach(), dims=([0], [w.axis])).abs().max() < 1e-5, w.label
    # the writers' parameter objects are unchanged (optimisers and references stay valid)
    assert {id(w.parameter) for w in residual_writers(edited)} <= params_before


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama", "llama_untied"])
def test_edit_lives_in_the_hugging_face_weights(kind, hf_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    bridge = _model(kind, hf_dirs)
    toks, r = _tokens(bridge), _vector(bridge)
    before = {k: v.clone() for k, v in _hf_state(bridge).items()}
    orthogonalize(bridge, r)
    after = _hf_state(bridge)
    u = (r / r.norm()).double()
    writers = {  # HF names of the residual writers, with their d_model axis
        "gpt2": [("transformer.wte.weight", 1), ("transformer.wpe.weight", 1)]
        + [(f"transformer.h.{i}.{m}.c_proj.{p}", 1 if p == "weight" else 0) for i in range(3) for m in ("attn", "mlp")
           for p in ("weight", "bias")],
        "neox": [("gpt_neox.embed_in.weight", 1)]
        + [(f"gpt_neox.layers.{i}.{m}.{p}", 0) for i in range(3) for m in ("attention.dense", "mlp.dense_4h_to_h")
           for p in ("weight", "bias")],
        "llama": [("model.embed_tokens.weight", 1)]
        + [(f"model.layers.{i}.{m}.weight", 0) for i in range(3) for m in ("self_attn.o_proj", "mlp.down_proj")],
    }[kind.split("_")[0]]  # fmt: skip
    for name, axis in writers:
        assert torch.tensordot(u, before[name].double(), dims=([0], [axis])).abs().max() > 1e-2, name
        assert torch.tensordot(u, after[name].double(), dims=([0], [axis])).abs().max() < 1e-5, name
    head = "lm_head.weight"
    # everything else, the unembedding included (its own unedited copy when it was tied), is unchanged
    unchanged = {k for k in after if torch.equal(after[k], before[k])}
    assert unchanged == set(after) - {n for n, _ in writers} and head in unchanged
    assert after[head].data_ptr() != after[writers[0][0]].data_ptr()
    # an exported state dict loads into a fresh model of the (untied) config and reloads from a folder
    with torch.no_grad():
        logits = bridge(toks)
    fresh = AutoModelForCausalLM.from_config(bridge.original_model.config).eval()
    fresh.load_state_dict(after, strict=True)
    fresh.save_pretrained(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=toks).logits, logits, atol=1e-5, rtol=0)
    assert not reloaded.config.tie_word_embeddings


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_keep_tied_also_stops_reading_the_vector(kind, hf_dirs):
    """tied="keep" edits the shared matrix: the same as also ablating r at the final norm's output."""
    hooked, kept, untied = _model(kind, hf_dirs), _model(kind, hf_dirs), _model(kind, hf_dirs)
    toks, r = _tokens(hooked), _vector(hooked)
    orthogonalize(kept, r, tied="keep")
    orthogonalize(untied, r)
    assert embeddings_tied(kept)
    L = int(hooked.cfg.n_layers)
    final = Direction.from_vectors(r, [L - 1], site="ln_final_out")
    with torch.no_grad():
        with ablate_everywhere(hooked, r), steer(hooked, final, 0.0, ablate=True):
            expect = hooked(toks)
        got, other = kept(toks), untied(toks)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)
    assert (got - other).abs().max() > 1e-2


def test_errors():
    model = make_native()
    with pytest.raises(ConfigError, match="tied="):
        orthogonalize(model, torch.ones(32), tied="copy")
    with pytest.raises(DirectionError, match="pick one"):
        orthogonalize(model, random_direction(32, [0, 1], seed=0))
    with pytest.raises(DirectionError, match="zero"):
        orthogonalize(model, torch.zeros(32))
    labels = [w.label for w in residual_writers(model)]
    assert labels[:2] == ["embed.weight", "pos_embed.weight"] and "blocks.2.mlp.out.bias" in labels
    assert "pos_embed.weight" not in [
        w.label for w in residual_writers(make_native(positional_embedding_type="rotary"))
    ]
