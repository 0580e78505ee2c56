"""Batched greedy decoding: left-padded batches match one-prompt-at-a-time decoding; stop and length limits;
the KV-cache decoder gives transformers' greedy tokens on GPT-2, GPT-NeoX and Llama (GQA), with hooks too."""

import jaxtyping
import pytest
import torch
from conftest import make_native, random_seqs
from hf_fixtures import save_tiny

from reversion_lens import generation
from reversion_lens.directions import Direction
from reversion_lens.errors import ConfigError, ShapeError
from reversion_lens.generation import cache_support, greedy_generate
from reversion_lens.interventions import block
from reversion_lens.probes import pad_sequences


# ------------------------------------------------------------------ the toy (native) path: no cache
@pytest.fixture(scope="module")
def model():
    return make_native(n_layers=2, d_model=32, d_vocab=40, seed=3)


@pytest.fixture(scope="module")
def seqs():
    return random_seqs(11, vocab=40, lo=2, hi=9, seed=1)  # mixed lengths 2..8, ids 1..39 (0 = pad)


def one_at_a_time(model, seqs, max_new, stop=None):
    return [greedy_generate(model, torch.tensor([s]), None, max_new, stop_token=stop)[0] for s in seqs]


@pytest.fixture(scope="module")
def free(model, seqs):
    """The oracle: each prompt decoded alone for 8 tokens, no stop token."""
    return one_at_a_time(model, seqs, 8)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_single(model, seqs, free, side):
    toks, mask = pad_sequences(seqs, 0, side)
    single = [row[:6] for row in free]  # greedy decoding is prefix-consistent
    for bs in (1, 4, 64):
        assert greedy_generate(model, toks, mask, 6, batch_size=bs) == single
    assert all(len(r) == 6 for r in single)


def test_single_matches_manual_argmax_loop(model, seqs):
    s = seqs[0]
    x = torch.tensor([s])
    expected = []
    with torch.no_grad():
        for _ in range(4):
            nxt = int(model(x)[0, -1].argmax())
            expected.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    assert greedy_generate(model, torch.tensor([s]), None, 4) == [expected]


def test_stop_token_ends_each_row_and_is_included(model, seqs, free):
    stop = free[0][2]  # a token the first prompt generates at step 3
    toks, mask = pad_sequences(seqs, 0, "left")
    out = greedy_generate(model, toks, mask, 8, stop_token=stop, batch_size=4)
    assert out == one_at_a_time(model, seqs, 8, stop)
    for row, full in zip(out, free):
        if stop in full:
            k = full.index(stop)
            assert row == full[: k + 1] and row[-1] == stop
        else:
            assert row == full and len(row) == 8
    assert len(out[0]) <= 3


def test_max_new_tokens_and_errors(model, seqs):
    toks, mask = pad_sequences(seqs, 0, "right")
    assert greedy_generate(model, toks, mask, 0) == [[] for _ in seqs]
    assert [len(r) for r in greedy_generate(model, toks, mask, 3)] == [3] * len(seqs)
    with pytest.raises(ShapeError, match="exceeds the model's context"):
        greedy_generate(model, toks, mask, model.cfg.n_ctx)
    with pytest.raises((ShapeError, jaxtyping.TypeCheckError)):  # jaxtyping's, when runtime checks are on
        greedy_generate(model, toks, mask[:, :-1], 2)
    with pytest.raises(ConfigError, match="cache must be"):
        greedy_generate(model, toks, mask, 2, cache="yes")
    before = toks.clone()
    greedy_generate(model, toks, mask, 2)
    assert torch.equal(toks, before)  # inputs are not modified


def test_native_bridge_has_no_cache_and_says_so(model, seqs, free):
    ok, reason = cache_support(model)
    assert not ok and "no Hugging Face model" in reason
    toks, mask = pad_sequences(seqs, 0, "left")
    assert greedy_generate(model, toks, mask, 5) == [row[:5] for row in free]  # automatic: the no-cache decoder
    with pytest.raises(ConfigError, match="cache=True but .*no Hugging Face model"):
        greedy_generate(model, toks, mask, 5, cache=True)


# ------------------------------------------------------------------ Hugging Face families: cache vs transformers
ARCHS = ["gpt2", "neox", "llama"]
MAX_NEW = 12


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """``{arch: (bridge, plain transformers model, folder)}``, random weights, built once per module."""
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gen_models")
    out = {}
    for arch in ARCHS:
        folder = save_tiny(arch, root / arch, seed=0)
        bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
        out[arch] = (bridge, AutoModelForCausalLM.from_pretrained(folder).eval(), folder)
    return out


@pytest.fixture(scope="module")
def prompts():
    return random_seqs(7, vocab=60, lo=2, hi=10, seed=5)  # lengths 2..9, ids 1..59 (0 = pad)


def hf_greedy(hf, seqs, max_new, eos=None):
    """The oracle: transformers' greedy ``generate`` on the left-padded batch; rows cut after ``eos``."""
    toks, mask = pad_sequences(seqs, 0, "left")
    with torch.no_grad():
        out = hf.generate(toks, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                          eos_token_id=eos)  # fmt: skip
    rows = out[:, toks.shape[1] :].tolist()
    return rows if eos is None else [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def seen_lengths(model, call):
    """Sequence lengths that ``blocks.0.hook_resid_post`` sees during ``call()``: proves which decoder ran."""
    lengths = []

    def record(x, hook):
        lengths.append(x.shape[1])

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", record)]):
        result = call()
    return result, lengths


def noop(x, hook):
    return None


# A forward hook inside a block (not at resid_pre/post): the cached decoder must go through the bridge.
INSIDE = [("blocks.0.mlp.hook_out", noop)]


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_equals_no_cache_equals_transformers(hf_models, prompts, arch):
    bridge, hf, _ = hf_models[arch]
    assert cache_support(bridge) == (True, hf.config.model_type)
    assert generation._plan(bridge, None) == "transformers"
    expected = hf_greedy(hf, prompts, MAX_NEW)
    toks, mask = pad_sequences(prompts, 0, "right")  # either side in; re-padded on the left inside
    width = toks.shape[1]
    cached, lengths = seen_lengths(bridge, lambda: greedy_generate(bridge, toks, mask, MAX_NEW, cache=True))
    assert lengths == [width] + [1] * (MAX_NEW - 1)  # one prompt forward, then one token per step
    assert cached == expected
    split, lengths = seen_lengths(bridge, lambda: greedy_generate(bridge, toks, mask, MAX_NEW, batch_size=3))
    assert split == expected and lengths.count(1) == 3 * (MAX_NEW - 1)  # automatic = cached, 3 batches
    with bridge.hooks(fwd_hooks=INSIDE):
        assert generation._plan(bridge, None) == "bridge"
        through_bridge, lengths = seen_lengths(bridge, lambda: greedy_generate(bridge, toks, mask, MAX_NEW))
    assert through_bridge == expected and lengths == [width] + [1] * (MAX_NEW - 1)
    plain, lengths = seen_lengths(bridge, lambda: greedy_generate(bridge, toks, mask, MAX_NEW, cache=False))
    assert plain == expected and 1 not in lengths
    assert len({tuple(r) for r in expected}) > 1 and all(len(r) == MAX_NEW for r in expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_token_per_row_with_cache(hf_models, prompts, arch):
    bridge, hf, _ = hf_models[arch]
    free = hf_greedy(hf, prompts, MAX_NEW)
    # A token that ends some rows early but that other rows never produce: rows must stop independently.
    candidates = [t for row in free for t in row[:4] if any(t not in r for r in free)]
    stop = candidates[0]
    expected = hf_greedy(hf, prompts, MAX_NEW, eos=stop)
    assert any(len(r) < MAX_NEW and r[-1] == stop for r in expected) and any(len(r) == MAX_NEW for r in expected)
    toks, mask = pad_sequences(prompts, 0, "left")
    for cache in (True, False):
        assert greedy_generate(bridge, toks, mask, MAX_NEW, stop_token=stop, cache=cache) == expected
    with bridge.hooks(fwd_hooks=INSIDE):  # the cached decoder through the bridge
        assert greedy_generate(bridge, toks, mask, MAX_NEW, stop_token=stop) == expected
    # A batch in which every row stops: decoding ends early and each row keeps its stop token.
    early = [p for p, r in zip(prompts, expected) if r[-1] == stop]
    et, em = pad_sequences(early, 0, "left")
    out, lengths = seen_lengths(bridge, lambda: greedy_generate(bridge, et, em, MAX_NEW, stop_token=stop, cache=True))
    assert out == [r for r in expected if r[-1] == stop]
    assert len(lengths) == max(len(r) for r in out) < MAX_NEW


def random_direction(bridge, seed):
    g = torch.Generator().manual_seed(seed)
    L, d = bridge.cfg.n_layers, bridge.cfg.d_model
    return Direction.from_vectors(torch.randn(L, d, generator=g), list(range(L)), site="resid_post")


@pytest.mark.parametrize("arch", ARCHS)
def test_interventions_act_on_every_cached_token(hf_models, prompts, arch):
    bridge, hf, _ = hf_models[arch]
    toks, mask = pad_sequences(prompts, 0, "left")
    unhooked = hf_greedy(hf, prompts, MAX_NEW)
    v = random_direction(bridge, seed=11)
    L = bridge.cfg.n_layers

    def decode(cache):
        return seen_lengths(bridge, lambda: greedy_generate(bridge, toks, mask, MAX_NEW, cache=cache))

    def add(x, hook):
        return x + 3.0 * v[int(hook.name.split(".")[1])].to(x.dtype)

    # ablate (projection at resid_pre and resid_post of every layer) and steering (a direction added to
    # resid_post, or inside each block at the MLP output), each with the cache and without it
    cases = {
        "ablate": (lambda: block(bridge, v, mode="ablate", sites=["resid_pre", "resid_post"]), "transformers"),
        "steer resid_post": (lambda: bridge.hooks(fwd_hooks=[(f"blocks.{l}.hook_resid_post", add) for l in range(L)]),
                             "transformers"),
        "steer mlp_out": (lambda: bridge.hooks(fwd_hooks=[(f"blocks.{l}.mlp.hook_out", add) for l in range(L)]),
                          "bridge"),
    }  # fmt: skip
    for name, (attach, plan) in cases.items():
        with attach():
            assert generation._plan(bridge, None) == plan, (name, generation._fast_path_blocker(bridge))
            (cached, lengths), (plain, _) = decode(None), decode(False)
        assert lengths == [toks.shape[1]] + [1] * (MAX_NEW - 1), name
        assert cached == plain and cached != unhooked, name
    # a plain PyTorch hook on a bridge submodule (not a hook point) is honoured too: through the bridge
    handle = bridge.blocks[1].mlp.register_forward_hook(lambda module, args, out: out + 3.0 * v[1].to(out.dtype))
    try:
        blocker = generation._fast_path_blocker(bridge)
        assert blocker.startswith("a forward hook on blocks.1.") and blocker.endswith("mlp"), blocker
        (cached, lengths), (plain, _) = decode(None), decode(False)
    finally:
        handle.remove()
    assert lengths == [toks.shape[1]] + [1] * (MAX_NEW - 1) and cached == plain and cached != unhooked
    assert greedy_generate(bridge, toks, mask, MAX_NEW) == unhooked  # every hook removed
    assert generation._plan(bridge, None) == "transformers"


def test_fast_path_follows_the_bridge_weights(hf_models, prompts):
    """The transformers twin shares the bridge's tensors: in-place edits (training steps) show at once, and a
    replaced tensor makes it rebuild; either way its tokens are the no-cache decoder's."""
    bridge, hf, _ = hf_models["llama"]
    toks, mask = pad_sequences(prompts, 0, "left")
    unhooked = hf_greedy(hf, prompts, MAX_NEW)
    linear = bridge.blocks[1].mlp.out.original_component
    original = linear.weight
    saved = original.detach().clone()
    try:
        with torch.no_grad():
            original.mul_(-4.0)
        edited = greedy_generate(bridge, toks, mask, MAX_NEW, cache=False)
        assert edited != unhooked
        assert generation._plan(bridge, None) == "transformers"
        assert greedy_generate(bridge, toks, mask, MAX_NEW) == edited
        linear.weight = torch.nn.Parameter(saved * 4.0)  # a new tensor: the twin must not keep the old one
        replaced = greedy_generate(bridge, toks, mask, MAX_NEW, cache=False)
        assert replaced != edited and greedy_generate(bridge, toks, mask, MAX_NEW) == replaced
    finally:
        linear.weight = original
        with torch.no_grad():
            original.copy_(saved)
    assert greedy_generate(bridge, toks, mask, MAX_NEW) == unhooked


def test_per_input_clamp_falls_back_to_no_cache(hf_models, prompts):
    from transformer_lens import TransformerBridge

    bridge, hf, folder = hf_models["llama"]
    reference = TransformerBridge.boot_transformers(str(folder), device="cpu")
    with torch.no_grad():  # a reference that differs from the model, so the clamp changes the tokens
        for p in reference.parameters():
            p.mul_(1.5)
    v = random_direction(bridge, seed=2)
    toks, mask = pad_sequences(prompts, 0, "left")
    unhooked = hf_greedy(hf, prompts, MAX_NEW)
    with block(bridge, v, mode="clamp", reference_model=reference) as clamp:
        ok, reason = cache_support(bridge)
        assert not ok and "per-input clamp" in reason
        auto, lengths = seen_lengths(bridge, lambda: greedy_generate(bridge, toks, mask, MAX_NEW))
        assert 1 not in lengths  # the no-cache decoder ran
        assert auto == greedy_generate(bridge, toks, mask, MAX_NEW, cache=False) and auto != unhooked
        with pytest.raises(ConfigError, match="cache=True but a per-input clamp"):
            greedy_generate(bridge, toks, mask, MAX_NEW, cache=True)
        with clamp.paused():  # a paused clamp does nothing: the cache is fine again
            assert cache_support(bridge)[0]
            assert greedy_generate(bridge, toks, mask, MAX_NEW) == unhooked


def test_unverified_family_decodes_without_cache_unless_forced(hf_models, prompts, monkeypatch):
    bridge, _, _ = hf_models["gpt2"]
    monkeypatch.setattr(generation, "CACHE_VERIFIED_FAMILIES", frozenset())
    ok, reason = cache_support(bridge)
    assert not ok and "not verified" in reason and "cache=True" in reason
    toks, mask = pad_sequences(prompts, 0, "left")
    auto, lengths = seen_lengths(bridge, lambda: greedy_generate(bridge, toks, mask, 4))
    assert 1 not in lengths
    forced, lengths = seen_lengths(bridge, lambda: greedy_generate(bridge, toks, mask, 4, cache=True))
    assert lengths.count(1) == 3 and forced == auto


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformer_lens_cache_bug_is_still_there(hf_models, arch):
    """The upstream bug that generation.py works around (TransformerLens 4.3 + transformers 5.24): the bridge's
    attention never writes the cache, so its cached decoding attends to the new token alone. When this fails,
    TransformerLens reads ``cache=``: the alias pre-hook in generation.py can go (keep the equality tests)."""
    bridge, _, _ = hf_models[arch]
    with torch.no_grad():
        _, past = bridge(torch.tensor([[5, 6, 7, 8]]), return_type="logits_and_cache", use_cache=True)
        assert past.get_seq_length() == 0
        with generation._cache_alias(bridge):
            _, past = bridge(torch.tensor([[5, 6, 7, 8]]), return_type="logits_and_cache", use_cache=True)
        assert past.get_seq_length() == 4
    hooks = sum(len(m._forward_pre_hooks) for m in bridge.modules())
    with generation._cache_alias(bridge):
        assert sum(len(m._forward_pre_hooks) for m in bridge.modules()) == hooks + bridge.cfg.n_layers
    assert sum(len(m._forward_pre_hooks) for m in bridge.modules()) == hooks  # removed exactly
