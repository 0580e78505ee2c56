"""Interventions: each mode's guarantee, measured; hooks removed exactly, also on errors; controls."""

import pytest
import torch
from conftest import make_native, random_seqs

import reversion_lens as rl
from reversion_lens.directions import Direction, mean_difference
from reversion_lens.errors import ConfigError, DirectionError, ShapeError
from reversion_lens.interventions import (
    Ablate,
    Clamp,
    GradBlock,
    active_interventions,
    block,
    paused,
    project_out,
    random_control,
    residual_write_params,
)
from reversion_lens.interventions.base import _orthonormal
from reversion_lens.probes import pad_sequences
from reversion_lens.registry import MODES
from reversion_lens.sites import residual_write_hooks
from reversion_lens.training import Batch, OptimConfig, finetune, lm_loss

L, D, V = 3, 32, 40


def hook_count(model):
    """TransformerLens handles plus the PyTorch hooks underneath, over every distinct hook point."""
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(
        len(hp.fwd_hooks) + len(hp.bwd_hooks) + len(hp._forward_hooks) + len(hp._backward_hooks) for hp in points
    )


def all_hooks(model):
    """:func:`hook_count` plus the PyTorch hooks on the model module itself (the per-input clamp's capture)."""
    return hook_count(model) + len(model._forward_pre_hooks) + len(model._forward_hooks)


def site_components(model, toks, mask, v, layers=range(L)):
    """``h.v`` ``[layer, batch, pos]`` at ``resid_post`` as the model computes it (after any clamp), via model(...)."""
    got = {}
    hooks = [
        (f"blocks.{l}.hook_resid_post", lambda x, hook, l=l: got.__setitem__(l, x.detach() @ v[l])) for l in layers
    ]
    with model.hooks(fwd_hooks=hooks):
        logits = model(toks, attention_mask=mask)
    return torch.stack([got[l] for l in layers]), logits


def padded(seed=6, n=4):
    """Left-padded token rows with their attention mask (the mask changes positions, so it must reach the reference)."""
    return pad_sequences(random_seqs(n, vocab=V, lo=4, hi=12, seed=seed), 0, padding_side="left")


def rand_direction(seed=1, layers=None):
    layers = tuple(range(L)) if layers is None else tuple(layers)
    g = torch.Generator().manual_seed(seed)
    return Direction.from_vectors(torch.randn(len(layers), D, generator=g), layers)


class Data:
    """Deterministic random token batches: ``batch(step)`` depends on the step only."""

    def __init__(self, vocab=V, batch=4, pos=12, seed=0):
        self.vocab, self.shape, self.seed = vocab, (batch, pos), seed

    def batch(self, step):
        g = torch.Generator().manual_seed(self.seed * 100003 + step)
        t = torch.randint(1, self.vocab, self.shape, generator=g)
        return Batch(t, torch.ones_like(t), torch.ones_like(t))


def v_component(p, v, axis):
    return torch.tensordot(v, p, dims=([0], [axis]))


@pytest.fixture(scope="module")
def probes():
    return rl.ProbeSet.from_tokens(random_seqs(8, vocab=V, seed=2))


# ---------------------------------------------------------------- pure math
def test_project_out_and_composed_basis():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    b = b + 3 * a  # far from orthogonal
    Q = _orthonormal(torch.stack([a, b]))
    x = torch.randn(5, 7, D, generator=g, dtype=torch.float64)
    y = project_out(x, Q)
    assert (y @ a).abs().max() < 1e-10 and (y @ b).abs().max() < 1e-10  # both removed at once
    torch.testing.assert_close(project_out(y, Q), y, atol=1e-12, rtol=0)  # idempotent
    w = torch.randn(D, generator=g, dtype=torch.float64)
    w = w - Q.T @ (Q @ w)
    torch.testing.assert_close(project_out(w, Q), w, atol=1e-12, rtol=0)  # the complement is untouched
    one = _orthonormal(torch.stack([a / a.norm()]))
    assert torch.equal(one, (a / a.norm())[None])


# ---------------------------------------------------------------- grad
def test_grad_block_orthogonal_sites_and_weights_over_sgd_steps():
    torch.manual_seed(0)
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    v = rand_direction()
    data = Data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    writes = residual_write_params(model)
    W0 = [p.detach().clone() for _, _, p, _ in writes]
    site_grads = {}
    probes = []
    for layer in range(L):
        for name in residual_write_hooks(model, layer):
            hp = model.hook_dict[name]

            def pre(mod, args, name=name, layer=layer):  # the gradient leaving the hook point, after the block
                args[0].register_hook(lambda g: site_grads.__setitem__(name, (layer, g)))

            probes.append(hp.register_forward_pre_hook(pre))
    try:
        with block(model, v, mode="grad") as iv:
            assert iv.hook_count == 3 * L
            for step in range(4):
                site_grads.clear()
                loss = model(data.batch(step).tokens, return_type="loss")
                opt.zero_grad()
                loss.backward()
                assert len(site_grads) == 3 * L
                for name, (layer, g) in site_grads.items():
                    assert (g @ v[layer]).abs().max() < 1e-6, name
                    assert g.abs().max() > 1e-4  # a real gradient, only its v part removed
                for label, layer, p, axis in writes:
                    assert v_component(p.grad, v[layer], axis).abs().max() < 1e-6, (step, label)
                opt.step()
    finally:
        for h in probes:
            h.remove()
    for (label, layer, p, axis), w0 in zip(writes, W0):  # SGD + momentum: the weights never moved along v
        assert v_component(p.detach() - w0, v[layer], axis).abs().max() < 1e-6, label
    # the contrast: without the block the same weights do get v gradients
    model.zero_grad()
    model(data.batch(9).tokens, return_type="loss").backward()
    worst = max(v_component(p.grad, v[layer], axis).abs().max().item() for _, layer, p, axis in writes)
    assert worst > 1e-3


def test_residual_write_params_native_axes(tiny_model):
    got = {label: (layer, tuple(p.shape), axis) for label, layer, p, axis in residual_write_params(tiny_model, [0, 2])}
    assert got["embed.weight"] == (0, (V, D), 1)
    assert got["pos_embed.weight"] == (0, (32, D), 1)
    assert got["blocks.0.attn.o.weight"] == (0, (D, D), 0)
    assert got["blocks.2.mlp.out.weight"] == (2, (D, 4 * D), 0)
    assert got["blocks.2.mlp.out.bias"] == (2, (D,), 0)
    assert not any(label.startswith("blocks.1.") for label in got)
    assert (
        tiny_model.blocks[2].mlp.out.original_component.weight
        is dict((label, p) for label, _, p, _ in residual_write_params(tiny_model, [2]))["blocks.2.mlp.out.weight"]
    )


# ---------------------------------------------------------------- clamp / ablate
def test_clamp_pins_component_to_reference(probes):
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    ref_model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=5)
    ref = rl.residual_stats(ref_model, probes)
    v = mean_difference(rl.residual_stats(model, probes), ref)
    expected = torch.stack([ref.mean[i].double() @ v.vectors[i].double() for i in range(L)])
    toks = torch.tensor(random_seqs(3, vocab=V, lo=9, hi=10, seed=4))
    with block(model, v, mode="clamp", reference=ref) as iv:
        torch.testing.assert_close(iv.components, expected, atol=1e-12, rtol=0)
        _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"))
    for layer in range(L):
        comp = cache[f"blocks.{layer}.hook_resid_post"] @ v[layer]
        assert (comp - float(expected[layer])).abs().max() < 1e-5
    # the same components from means, from scalars indexed like the direction, and from a dict
    for reference in (ref.mean, expected, {l: float(expected[l]) for l in range(L)}):
        torch.testing.assert_close(
            block(model, v, "clamp", reference=reference).components, expected, atol=1e-6, rtol=0
        )
    sub = block(model, v, "clamp", layers=[2], reference=expected)
    assert sub.layers == (2,) and float(sub.components[0]) == pytest.approx(float(expected[2]), abs=1e-12)
    with pytest.raises(ShapeError, match="fits neither"):
        block(model, v, "clamp", reference=torch.zeros(5))


def test_per_input_clamp_pins_every_position_to_the_reference_through_training():
    torch.manual_seed(0)
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    ref = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)  # the aligned model, loaded a second time
    ref_before = {k: t.detach().clone() for k, t in ref.state_dict().items()}
    ref_training = [m.training for m in ref.modules()]
    W0 = {k: t.detach().clone() for k, t in model.state_dict().items()}
    v = rand_direction(3)
    data = Data(seed=2)
    seen = []  # the clamped components of every training forward, with that step's batch

    def loss_fn(m, batch):  # runs inside finetune, with the clamp active
        comps, _ = site_components(m, batch.tokens, batch.attention_mask, v, layers=[0, 1])
        seen.append((batch, comps))
        return lm_loss(m, batch)

    iv = block(model, v, "clamp", layers=[0, 1], reference_model=ref)
    assert isinstance(iv, Clamp) and iv.per_input and iv.describe()["reference"] == "per-input"
    finetune(
        model, data, 5, optim=OptimConfig(lr=1e-2, grad_clip=None), loss_fn=loss_fn, interventions=[iv], progress=False
    )
    assert all_hooks(model) == 0 and all_hooks(ref) == 0 and not iv.attached
    assert max((t - W0[k]).abs().max().item() for k, t in model.state_dict().items()) > 1e-2  # it trained
    for k, t in ref.state_dict().items():  # the reference never moved, and its train/eval flags are restored
        assert torch.equal(t, ref_before[k]), k
    assert [m.training for m in ref.modules()] == ref_training
    for batch, comps in seen[1:]:  # after each update: equal to the frozen reference on the same batch, everywhere
        want, _ = site_components(ref, batch.tokens, batch.attention_mask, v, layers=[0, 1])
        assert (comps - want).abs().max() < 1e-5
    # after training, on left-padded prompts (the attention mask reaches the reference too)
    toks, mask = padded()
    want, _ = site_components(ref, toks, mask, v)
    with block(model, v, "clamp", layers=[0, 1], reference_model=ref):
        got, _ = site_components(model, toks, mask, v)
        with paused(model):
            bare, _ = site_components(model, toks, mask, v)
    assert (got[:2] - want[:2]).abs().max() < 1e-5  # every position, both clamped layers
    assert (bare[:2] - want[:2]).abs().max() > 1e-2  # the trained weights alone do move along v
    assert (got[2] - want[2]).abs().max() > 1e-2  # layer 2 is not clamped
    real = mask.bool()
    assert want[0][real].std() > 0.1  # the reference's component varies by position: one mean scalar cannot match it


def test_per_input_clamp_under_early_stopping_reads_and_paused(probes):
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    ref = make_native(n_layers=L, d_model=D, d_vocab=V, seed=5)
    v = rand_direction(2)
    toks, mask = padded(seed=8)
    clean = model(toks, attention_mask=mask)
    ref_stats = rl.residual_stats(ref, probes)
    calls = []
    counter = ref.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with block(model, v, "clamp", layers=[1], reference_model=ref) as iv:
            with paused(model):  # no clamp and no reference forward
                assert torch.equal(model(toks, attention_mask=mask), clean)
                assert calls == []
            # residual_stats stops the forward early by raising in a hook: first before the clamped layer, then after
            early = rl.residual_stats(model, probes, layers=[0])
            full = rl.residual_stats(model, probes)
            assert len(calls) == 2  # one reference forward per model forward (one probe batch each)
            ref_again = rl.residual_stats(ref, probes)  # the reference used on its own: its readers stay inert
            # the forward was interrupted, and its components were dropped with it: nothing stale is reused
            with pytest.raises(ConfigError, match=r"did not capture.*model\(\.\.\.\)"):
                model.run_with_cache(toks)
            clamped = model(toks, attention_mask=mask)
        assert iv.hook_count == 0
    finally:
        counter.remove()
    torch.testing.assert_close(ref_again.mean, ref_stats.mean, atol=0, rtol=0)
    torch.testing.assert_close(early.mean[0], full.mean[0], atol=1e-6, rtol=0)  # layer 0 is upstream of the clamp
    # the probe reads at layer 1 carry the reference's component exactly (each prompt's own, so also the mean)
    assert abs(float((full.mean[1] - ref_stats.mean[1]).double() @ v[1].double())) < 1e-5
    assert abs(float((full.mean[2] - ref_stats.mean[2]).double() @ v[2].double())) > 1e-3
    assert (clamped - clean).abs().max() > 1e-3 and torch.equal(model(toks, attention_mask=mask), clean)


def test_per_input_clamp_hooks_removed_on_both_models(monkeypatch):
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    ref = make_native(n_layers=L, d_model=D, d_vocab=V, seed=5)
    v = rand_direction()
    model.blocks[0].hook_out.add_hook(lambda x, hook: None)  # users' hooks: must survive
    ref.blocks[1].hook_out.add_hook(lambda x, hook: None)
    start = (all_hooks(model), all_hooks(ref))
    assert start == (2, 2)
    with block(model, v, "clamp", reference_model=ref) as iv:
        assert iv.hook_count == 2 * L + 2  # L clamps, L reference readers, capture + release on the model
        # all_hooks counts a TransformerLens hook twice (its handle and the PyTorch hook underneath)
        assert (all_hooks(model), all_hooks(ref)) == (start[0] + 2 * L + 2, start[1] + 2 * L)
    assert (all_hooks(model), all_hooks(ref)) == start
    with pytest.raises(RuntimeError, match="boom"):
        with block(model, v, "clamp", reference_model=ref):
            raise RuntimeError("boom")
    assert (all_hooks(model), all_hooks(ref)) == start and active_interventions(model) == []
    # the reference forward itself fails (a token outside the vocabulary), inside the model's forward
    with pytest.raises(IndexError):
        with block(model, v, "clamp", reference_model=ref):
            model(torch.tensor([[1, 2, V + 5]]))
    assert (all_hooks(model), all_hooks(ref)) == start
    # registration fails half-way, on the reference (after the model's clamp hooks went on)
    hp = ref.hook_dict["blocks.2.hook_resid_post"]
    monkeypatch.setattr(hp, "add_hook", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("refused")))
    iv = block(model, v, "clamp", reference_model=ref)
    with pytest.raises(RuntimeError, match="refused"):
        iv.attach()
    assert (all_hooks(model), all_hooks(ref)) == start and not iv.attached and active_interventions(model) == []
    monkeypatch.undo()
    model.reset_hooks()
    ref.reset_hooks()
    assert all_hooks(model) == 0 and all_hooks(ref) == 0


def test_per_input_clamp_refuses_bad_references():
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    v = rand_direction()
    with pytest.raises(ConfigError, match="neither"):
        block(model, v, "clamp")
    with pytest.raises(ConfigError, match="both"):
        block(
            model, v, "clamp", reference=torch.zeros(L), reference_model=make_native(n_layers=L, d_model=D, d_vocab=V)
        )
    with pytest.raises(ConfigError, match="separate frozen copy"):
        block(model, v, "clamp", reference_model=model)
    shared = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    shared.blocks[1].mlp.out.original_component.weight = model.blocks[1].mlp.out.original_component.weight
    with pytest.raises(ConfigError, match="shares 1 parameter"):
        block(model, v, "clamp", reference_model=shared)
    with pytest.raises(ConfigError, match="d_vocab"):
        block(model, v, "clamp", reference_model=make_native(n_layers=L, d_model=D, d_vocab=V + 1))
    with pytest.raises(ShapeError, match="d_model"):
        block(model, v, "clamp", reference_model=make_native(n_layers=L, d_model=2 * D, d_vocab=V))
    ref = make_native(n_layers=L, d_model=D, d_vocab=V, seed=5)
    with block(model, v, "clamp", reference_model=ref):
        with pytest.raises(ConfigError, match="start_at_layer"):
            model(torch.randn(1, 4, D), start_at_layer=1)
    assert all_hooks(model) == 0 and all_hooks(ref) == 0


def test_ablate_zero_component_and_clean_removal():
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    v = rand_direction(3)
    toks = torch.tensor(random_seqs(3, vocab=V, lo=9, hi=10, seed=4))
    clean = model(toks)
    with block(model, v, mode="ablate"):
        logits, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"))
        with paused(model):
            assert torch.equal(model(toks), clean)  # paused hooks do nothing
    for layer in range(L):
        assert (cache[f"blocks.{layer}.hook_resid_post"] @ v[layer]).abs().max() < 1e-5
    assert (logits - clean).abs().max() > 1e-3  # it did change the computation
    assert torch.equal(model(toks), clean)  # and left nothing behind
    assert hook_count(model) == 0


# ---------------------------------------------------------------- update
def test_update_keeps_adamw_updates_orthogonal_where_grad_does_not():
    v = rand_direction(4)
    optim = OptimConfig(lr=1e-2, weight_decay=0.01, grad_clip=None)
    worst = {}
    for arm in ("grad", "update"):
        model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
        writes = residual_write_params(model)
        W0 = [p.detach().clone() for _, _, p, _ in writes]
        finetune(model, Data(), 10, optim=optim, interventions=[block(model, v, mode=arm)], progress=False)
        worst[arm] = max(
            v_component(p.detach() - w0, v[layer], axis).abs().max().item()
            for (_, layer, p, axis), w0 in zip(writes, W0)
        )
        moved = max((p.detach() - w0).abs().max().item() for (_, _, p, _), w0 in zip(writes, W0))
        assert moved > 1e-2  # the weights did train
    assert worst["update"] < 1e-6
    assert worst["grad"] > 1e-3  # AdamW rotates projected gradients back onto v
    # a hand-written loop: optimizer= registers a step post-hook, removed with the block
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    writes = residual_write_params(model, [1])
    W0 = [p.detach().clone() for _, _, p, _ in writes]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with block(model, v, "update", layers=[1], optimizer=opt):
        for step in range(5):
            opt.zero_grad()
            model(Data().batch(step).tokens, return_type="loss").backward()
            opt.step()
    assert not opt._optimizer_step_post_hooks
    for (label, layer, p, axis), w0 in zip(writes, W0):
        assert v_component(p.detach() - w0, v[layer], axis).abs().max() < 1e-6, label


def test_update_on_gpt2_conv1d_and_tied_embedding(tmp_path):
    from hf_fixtures import save_tiny_gpt2
    from transformer_lens import TransformerBridge

    model = TransformerBridge.boot_transformers(str(save_tiny_gpt2(tmp_path / "g", n_layers=2)), device="cpu")
    D2 = int(model.cfg.d_model)
    v = Direction.from_vectors(torch.randn(2, D2, generator=torch.Generator().manual_seed(0)))
    writes = residual_write_params(model)
    axes = {label: axis for label, _, _, axis in writes}
    assert axes["blocks.0.attn.o.weight"] == 1 and axes["blocks.1.mlp.out.weight"] == 1  # Conv1D is [in, out]
    W0 = [p.detach().clone() for _, _, p, _ in writes]
    data = Data(vocab=int(model.cfg.d_vocab), seed=1)
    finetune(model, data, 5, optim=OptimConfig(lr=1e-2), interventions=[block(model, v, "update")], progress=False)
    for (label, layer, p, axis), w0 in zip(writes, W0):
        assert v_component(p.detach() - w0, v[layer], axis).abs().max() < 1e-6, label


# ---------------------------------------------------------------- penalty
def test_penalty_push_and_block_move_projection_opposite_ways(probes):
    """v is the direction plain fine-tuning drifts along; push moves further along it, block less far."""
    optim = OptimConfig(lr=3e-3, grad_clip=None)
    steps = 6
    start = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    ref = rl.residual_stats(start, probes)
    plain = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    finetune(plain, Data(), steps, optim=optim, progress=False)
    v = mean_difference(rl.residual_stats(plain, probes), ref)  # normalize(drift of the plain run)
    base = make_native(n_layers=L, d_model=D, d_vocab=V, seed=7)
    base_stats = rl.residual_stats(base, probes)

    def final_projection(sign):
        model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
        ivs = (
            []
            if sign is None
            else [block(model, v, "penalty", probes=probes, reference=ref, base=base_stats, weight=50.0, sign=sign)]
        )
        result = finetune(model, Data(), steps, optim=optim, interventions=ivs, progress=False)
        if sign == "push":
            assert result.aux_losses[-1] < 0  # a reward: the loss goes down as the projection grows
        mean = rl.residual_stats(model, probes).mean.double()
        return ((mean - ref.mean.double()) * v.vectors.double()).sum(1)

    none, push, blocked = final_projection(None), final_projection("push"), final_projection("block")
    assert (none > 0).all()  # by construction
    assert (push > none).all()
    assert (blocked < none).all()


def test_penalty_loss_values(probes):
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    ref = rl.residual_stats(model, probes)
    v = rand_direction(2)
    comps = (ref.mean.double() * v.vectors.double()).sum(1)
    # reference = the model's own means: r = 0, so block costs 0 and push 0
    pen = block(model, v, "penalty", probes=probes, reference=ref)
    assert pen.projections(model).abs().max() < 1e-5
    assert float(pen.extra_loss(model, 0).detach()) == pytest.approx(0.0, abs=1e-10)
    # reference shifted by -1 along v at every layer: r = 1 everywhere
    shifted = block(model, v, "penalty", probes=probes, reference=comps - 1.0, weight=2.0, sign="block")
    assert float(shifted.extra_loss(model, 0).detach()) == pytest.approx(2.0, abs=1e-4)
    pushed = block(model, v, "penalty", probes=probes, reference=comps - 1.0, weight=2.0, sign="push")
    assert float(pushed.extra_loss(model, 0).detach()) == pytest.approx(-2.0, abs=1e-4)
    assert hook_count(model) == 0  # its probe forward leaves no hooks
    with pytest.raises(ConfigError, match="sign"):
        block(model, v, "penalty", probes=probes, reference=ref, sign="pull")


# ---------------------------------------------------------------- hook hygiene
@pytest.mark.parametrize("mode", ["grad", "clamp", "ablate"])
def test_hooks_removed_after_body_error_and_registration_error(mode, probes, monkeypatch):
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    v = rand_direction()
    opts = {"reference": torch.zeros(L)} if mode == "clamp" else {}
    model.blocks[0].hook_out.add_hook(lambda x, hook: None)  # a user's hook: must survive
    start = hook_count(model)
    assert start == 2
    with block(model, v, mode, **opts):
        assert hook_count(model) > start
    assert hook_count(model) == start
    with pytest.raises(RuntimeError, match="boom"):
        with block(model, v, mode, **opts):
            raise RuntimeError("boom")
    assert hook_count(model) == start and active_interventions(model) == []
    # registration fails half-way (the last layer's hook point refuses): nothing is left attached
    hp = model.hook_dict["blocks.2.hook_resid_post"]
    monkeypatch.setattr(hp, "add_hook", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("refused")))
    iv = block(model, v, mode, **opts)
    with pytest.raises(RuntimeError, match="refused"):
        iv.attach()
    assert hook_count(model) == start and not iv.attached and active_interventions(model) == []
    monkeypatch.undo()
    model.reset_hooks()
    assert hook_count(model) == 0


def test_notebook_handle_layers_and_errors():
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    v = rand_direction()
    h = block(model, v, layers=[1]).attach()
    assert isinstance(h, GradBlock) and h.layers == (1,) and h.hook_count == 3
    assert active_interventions(model) == [h]
    with pytest.raises(ConfigError, match="already attached"):
        h.attach()
    h.remove()
    h.remove()  # idempotent
    assert hook_count(model) == 0 and active_interventions(model) == []
    with pytest.raises(ConfigError, match="unknown intervention mode"):
        block(model, v, mode="freeze")
    with pytest.raises(ConfigError, match="bad options"):
        block(model, v, mode="grad", reference=torch.zeros(3))
    with pytest.raises(DirectionError, match="not covered|covers"):
        block(model, rand_direction(layers=[0, 1]), layers=[2])
    with pytest.raises(ShapeError, match="d_model"):
        block(model, Direction.from_vectors(torch.ones(L, D + 1)))
    assert isinstance(block(model, v, "ablate"), Ablate) and set(MODES.names()) == {
        "grad",
        "clamp",
        "ablate",
        "penalty",
        "penalty-block",
        "penalty-push",
        "update",
        "grad-cum",
        "grad-shared",
        "grad-everywhere",
        "update-cum",
        "orthogonalize",
        "grad-cum-exact",
    }


def test_random_control_matches_shape_and_is_seeded():
    v = rand_direction(layers=[0, 2])
    c = random_control(v, seed=3)
    assert c.layers == v.layers and c.site == v.site and torch.equal(c.norms, v.norms)
    assert torch.equal(c.vectors, random_control(v, seed=3).vectors)
    assert not torch.equal(c.vectors, random_control(v, seed=4).vectors)
    assert (c.vectors.norm(dim=1) - 1).abs().max() < 1e-6
    assert (c.vectors * v.vectors).sum(1).abs().max() < 0.9  # not the direction it controls
    model = make_native(n_layers=L, d_model=D, d_vocab=V, seed=0)
    assert block(model, c).describe()["direction"]["method"] == "random"
