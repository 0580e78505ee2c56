"""Steering (add a direction with a coefficient) and refusal_direction-style ablation at every site."""

import pytest
import torch
from conftest import make_native
from hf_fixtures import perturbed_copy, save_tiny

from reversion_lens.directions import Direction, random_direction
from reversion_lens.errors import ConfigError, DirectionError, ShapeError, SiteError
from reversion_lens.steering import EVERYWHERE_SITES, ablate_everywhere, last_token_mask, steer, steering_delta


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Random GPT-2, GPT-NeoX and Llama folders with perturbed weights (norm weights far from 1)."""
    root = tmp_path_factory.mktemp("steer_hf")
    return {
        arch: perturbed_copy(save_tiny(arch, root / f"{arch}0"), root / arch, scale=0.5)
        for arch in ("gpt2", "neox", "llama")
    }


def _bridge(folder):
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_transformers(str(folder), device="cpu")


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _model(kind, hf_dirs):
    return make_native(positional_embedding_type="rotary") if kind == "native" else _bridge(hf_dirs[kind])


def _tokens(model, batch=3, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, int(model.cfg.d_vocab), (batch, pos), generator=g)


def _hook_count(model):
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()  # aliases share one hook point
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in points)


def _hand_hook(v, c, ablate, mask):
    """The TransformerLens hook a user would write by hand: h + m * (c v - ablate (h.v) v)."""

    def hook(x, hook):
        delta = c * v - (x @ v)[..., None] * v if ablate else c * v
        return x + mask[..., None] * delta

    return hook


# ---------------------------------------------------------------- parity with hand-written hooks
CASES = [  # (positions, the mask it means for tokens [3, 7], ablate)
    (None, torch.ones(3, 7), False),
    ("last", torch.zeros(3, 7).index_fill_(1, torch.tensor([6]), 1.0), True),
    (slice(1, 4), torch.zeros(3, 7).index_fill_(1, torch.tensor([1, 2, 3]), 1.0), False),
    ([0, -2], torch.zeros(3, 7).index_fill_(1, torch.tensor([0, 5]), 1.0), True),
    (2, torch.zeros(3, 7).index_fill_(1, torch.tensor([2]), 1.0), False),
]


@pytest.mark.parametrize("kind", ["native", "llama"])
@pytest.mark.parametrize("case", range(len(CASES) + 1))
def test_steer_equals_hand_written_hook(kind, case, hf_dirs):
    model = _model(kind, hf_dirs)
    toks = _tokens(model)
    L, D = int(model.cfg.n_layers), int(model.cfg.d_model)
    if case < len(CASES):
        positions, mask, ablate = CASES[case]
    else:  # a per-token boolean mask, different per row
        mask = (torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.5).float()
        positions, ablate = mask.bool(), True
    site = "resid_pre" if case % 2 else "resid_post"
    v = random_direction(D, [0, L - 1], seed=case, site=site)
    coeffs = [3.0, -2.5]
    with torch.no_grad():
        expect = model.run_with_hooks(
            toks, fwd_hooks=[(f"blocks.{layer}.hook_{site}", _hand_hook(v[layer], c, ablate, mask))
                             for layer, c in zip(v.layers, coeffs)])  # fmt: skip
        with steer(model, v, coeffs, positions=positions, ablate=ablate) as h:
            assert h.hook_count == 2
            got = model(toks)
        plain = model(toks)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-2  # the steering did something
    assert _hook_count(model) == 0


def test_coefficients_per_layer_scale_and_layers():
    model = make_native()
    toks = _tokens(model)
    v = Direction.from_vectors(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 5)
    with torch.no_grad():
        with steer(model, v, {0: 1.0, 2: -1.0}, layers=[0, 2], scale="norm"):
            by_norm = model(toks)
        coeffs = [float(v.norms[0]), -float(v.norms[2])]
        with steer(model, v.select([0, 2]), torch.tensor(coeffs)):
            by_value = model(toks)
        with steer(model, v, 0.0):
            zero = model(toks)
        plain = model(toks)
    torch.testing.assert_close(by_norm, by_value, atol=1e-6, rtol=0)
    torch.testing.assert_close(zero, plain, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="2 coefficients for 3"):
        steer(model, v, [1.0, 2.0])
    with pytest.raises(ConfigError, match="no value for layer"):
        steer(model, v, {0: 1.0})


def test_ablate_then_add_sets_the_component():
    model = make_native()
    v = random_direction(32, [1], seed=3)
    with torch.no_grad(), steer(model, v, 2.5, ablate=True, positions="last"):
        _, cache = model.run_with_cache(_tokens(model), names_filter="blocks.1.hook_resid_post")
    proj = cache["blocks.1.hook_resid_post"] @ v[1]
    torch.testing.assert_close(proj[:, -1], torch.full((3,), 2.5), atol=1e-5, rtol=0)
    assert (proj[:, :-1] - 2.5).abs().min() > 1e-3  # other positions untouched
    x = torch.randn(4, 32)
    torch.testing.assert_close(steering_delta(x, v[1], 0.0, ablate=True) @ v[1], -(x @ v[1]), atol=1e-5, rtol=0)


def test_last_token_mask_for_right_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert last_token_mask(mask).tolist() == [[0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    assert last_token_mask(torch.tensor([[0, 1, 1], [0, 0, 1]])).tolist() == [[0, 0, 1], [0, 0, 1]]


# ---------------------------------------------------------------- Hugging Face semantics
def _hf_blocks(hf):
    kind = hf.config.model_type
    if kind == "gpt2":
        return [(b, b.attn, b.mlp, b.ln_1, b.ln_2) for b in hf.transformer.h], hf.transformer.ln_f
    if kind == "gpt_neox":
        blocks = hf.gpt_neox.layers
        return [
            (b, b.attention, b.mlp, b.input_layernorm, b.post_attention_layernorm) for b in blocks
        ], hf.gpt_neox.final_layer_norm
    return [
        (b, b.self_attn, b.mlp, b.input_layernorm, b.post_attention_layernorm) for b in hf.model.layers
    ], hf.model.norm


def _edit_output(fn):
    def hook(module, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

    return hook


def _edit_input(fn):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return hook


def _with_hf_hooks(hf, toks, hooks):
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(_edit_input(fn), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(_edit_output(fn)))
        with torch.no_grad():
            return hf(input_ids=toks).logits
    finally:
        for h in handles:
            h.remove()


# (site, which HF module, pre-hook on its input or hook on its output): steering-vectors' layer types
HF_SITES = {
    "resid_post": (0, "out"),  # decoder block output ("decoder_block")
    "resid_pre": (0, "pre"),
    "attn_out": (1, "out"),  # "self_attn"
    "mlp_out": (2, "out"),  # "mlp"
    "ln1_in": (3, "pre"),
    "ln1_out": (3, "out"),  # "input_layernorm"
    "ln2_in": (4, "pre"),
    "ln2_out": (4, "out"),  # "post_attention_layernorm"
}


@pytest.mark.parametrize(
    "arch,site",
    [("llama", s) for s in HF_SITES]
    + [
        ("llama", "ln_final_out"),
        ("gpt2", "ln1_out"),
        ("gpt2", "ln2_in"),
        ("neox", "ln2_out"),
        ("neox", "resid_post"),
    ],
)
def test_steer_equals_a_hugging_face_module_hook(arch, site, hf_dirs):
    """Steering at a site equals adding c v at the matching Hugging Face module (steering-vectors' semantics)."""
    bridge, hf = _bridge(hf_dirs[arch]), _hf(hf_dirs[arch])
    toks = _tokens(bridge, batch=2, pos=6)
    L = int(bridge.cfg.n_layers)
    layer = L - 1 if site == "ln_final_out" else 1
    v = random_direction(int(bridge.cfg.d_model), [layer], seed=7, site=site)
    c = 3.0
    blocks, final_norm = _hf_blocks(hf)
    module, kind = (
        (final_norm, "out") if site == "ln_final_out" else (blocks[layer][HF_SITES[site][0]], HF_SITES[site][1])
    )
    expect = _with_hf_hooks(hf, toks, [(module, kind, lambda x: x + c * v[layer].to(x.dtype))])
    with torch.no_grad():
        plain = bridge(toks)
        with steer(bridge, v, c):
            got = bridge(toks)
    torch.testing.assert_close(plain, hf(input_ids=toks).logits.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-2


def _refusal_direction_hooks(hf, r):
    """andyrdt/refusal_direction's get_all_direction_ablation_hooks, as semantics: every block's input
    (pre-hook), every attention and MLP module's output, h -> h - (h.r) r with r normalised."""

    def ablate(x):
        u = (r / r.norm()).to(x.dtype)
        return x - (x @ u)[..., None] * u

    blocks, _ = _hf_blocks(hf)
    return [(b[0], "pre", ablate) for b in blocks] + [(b[i], "out", ablate) for i in (1, 2) for b in blocks]


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama"])
def test_ablate_everywhere_is_refusal_direction_ablation(arch, hf_dirs):
    bridge, hf = _bridge(hf_dirs[arch]), _hf(hf_dirs[arch])
    toks = _tokens(bridge, batch=2, pos=6)
    r = torch.randn(int(bridge.cfg.d_model), generator=torch.Generator().manual_seed(0)) * 3
    expect = _with_hf_hooks(hf, toks, _refusal_direction_hooks(hf, r))
    with torch.no_grad(), ablate_everywhere(bridge, r) as h:
        assert h.hook_count == 3 * int(bridge.cfg.n_layers)
        got = bridge(toks)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)
    assert (got - hf(input_ids=toks).logits).abs().max() > 1e-2
    assert _hook_count(bridge) == 0


@pytest.mark.parametrize("kind", ["native", "gpt2", "neox", "llama"])
def test_ablate_everywhere_leaves_no_component(kind, hf_dirs):
    model = _model(kind, hf_dirs)
    r = torch.randn(int(model.cfg.d_model), generator=torch.Generator().manual_seed(1))
    u = r / r.norm()
    names = [
        f"blocks.{layer}.hook_{s}"
        for layer in range(int(model.cfg.n_layers))
        for s in (*EVERYWHERE_SITES, "resid_post")
    ]
    with torch.no_grad():
        _, before = model.run_with_cache(_tokens(model), names_filter=names)
        with ablate_everywhere(model, Direction.from_vectors(r, [0])):
            _, cache = model.run_with_cache(_tokens(model), names_filter=names)
    worst = max(float((cache[n] @ u).abs().max()) for n in names)
    assert worst <= 1e-5
    assert max(float((before[n] @ u).abs().max()) for n in names) > 1e-1


# ---------------------------------------------------------------- hook discipline and errors
def test_hooks_removed_on_error_and_half_way(monkeypatch):
    model = make_native()
    keep = model.hook_dict["blocks.0.hook_resid_post"].add_hook(lambda x, hook: None)  # a user's own hook
    v = random_direction(32, [0, 1, 2], seed=0)
    with pytest.raises(RuntimeError, match="boom"), steer(model, v, 1.0):
        assert _hook_count(model) == 4
        raise RuntimeError("boom")
    assert _hook_count(model) == 1
    hp = model.hook_dict["blocks.2.hook_resid_post"]
    monkeypatch.setattr(hp, "add_hook", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("registration failed")))
    h = steer(model, v, 1.0)
    with pytest.raises(RuntimeError, match="registration failed"):
        h.attach()
    assert _hook_count(model) == 1 and not h.attached
    monkeypatch.undo()
    h = steer(model, v, 1.0).attach()  # the notebook handle
    with pytest.raises(ConfigError, match="already attached"):
        h.attach()
    h.remove()
    h.remove()  # idempotent
    assert _hook_count(model) == 1
    keep.hook.remove()


def test_bad_input_errors(hf_dirs):
    model = make_native()
    v = random_direction(32, [0], seed=0)
    toks = _tokens(model)
    with pytest.raises(ShapeError, match="positions mask has shape"), steer(model, v, 1.0, positions=torch.ones(2, 7)):
        model(toks)
    with pytest.raises(ShapeError, match="out of range"), steer(model, v, 1.0, positions=[9]):
        model(toks)
    with pytest.raises(ConfigError, match="0/1"):
        steer(model, v, positions=torch.tensor([0, 2, 1]))
    with pytest.raises(ConfigError, match="positions="):
        steer(model, v, positions="first")
    with pytest.raises(ConfigError, match="scale="):
        steer(model, v, scale="raw")
    with pytest.raises(DirectionError, match="Direction.from_vectors"):
        steer(model, torch.ones(32))
    with pytest.raises(SiteError, match="resid_mid only changes the MLP branch"):
        steer(model, v, site="resid_mid")
    with pytest.raises(DirectionError, match="pick one"):
        ablate_everywhere(model, random_direction(32, [0, 1], seed=0))
    with pytest.raises(DirectionError, match="zero"):
        ablate_everywhere(model, torch.zeros(32))
    with pytest.raises(ShapeError, match="d_model 16"):
        ablate_everywhere(model, torch.ones(16))
