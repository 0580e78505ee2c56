"""``update-cum``: ``U_j^T W`` of every residual writer of layer ``j`` stays at its value at attach, under AdamW.

The guarantee measured: ``max |u^T (W_t - W_0)|`` along ``d_model`` over every residual-writing weight (embeddings
included, tied or not) of layer ``j`` and every ``u`` in the (sub)space of a blocked layer ``l >= j``, after AdamW
steps with weight decay (float32 parameters: below 1e-5). The per-layer ``update`` block does not give it.
"""

import pytest
from conftest import make_native
from modes_helpers import Tokens, components, loss_backward, rand_direction, sub, worst_gradient, writer_motion

from reversion_lens.directions import random_subspace
from reversion_lens.errors import ConfigError
from reversion_lens.interventions import block
from reversion_lens.interventions.update import writer_layer
from reversion_lens.orthogonalize import embeddings_tied, residual_writers
from reversion_lens.training import OptimConfig, finetune, make_optimizer, train_step

L, D = 4, 32
ADAMW = OptimConfig(lr=1e-2, weight_decay=0.05, grad_clip=None)


def snapshot(model):
    return {w.label: w.parameter.detach().clone() for w in residual_writers(model)}


def worst_change(model, w0, space, blocked, shared=False):
    """``max |u^T (W_t - W_0)|`` per writer over the rows of every blocked layer it must keep fixed."""
    out = {}
    for w in residual_writers(model):
        j = writer_layer(w.label)
        rows = [space[l] for l in blocked if shared or l >= j]
        if rows:
            delta = w.parameter.detach() - w0[w.label]
            out[w.label] = max(components(delta, u, w.axis).abs().max().item() for r in rows for u in r)
    return out


def train(model, iv, steps=4, optim=ADAMW):
    finetune(model, Tokens(int(model.cfg.d_vocab)), steps, optim=optim, interventions=[iv], progress=False)


@pytest.mark.parametrize("blocked", [None, (1, 3)])
def test_update_cum_native_pins_every_earlier_writer_under_adamw_where_update_does_not(blocked):
    v = rand_direction(L, D)
    layers = blocked or tuple(range(L))
    model = make_native(n_layers=L, d_model=D)
    w0 = snapshot(model)
    train(model, block(model, v, "update-cum", layers=blocked))
    worst = worst_change(model, w0, sub(v, layers), layers)
    assert max(worst.values()) < 1e-5, worst
    assert {"embed.weight", "pos_embed.weight", "blocks.0.attn.o.bias"} <= set(worst)  # embeddings and biases too
    moved = max((w.parameter.detach() - w0[w.label]).abs().max().item() for w in residual_writers(model))
    assert moved > 1e-3  # the weights did train
    ref = make_native(n_layers=L, d_model=D)
    r0 = snapshot(ref)
    train(ref, block(ref, v, "update", layers=blocked))
    assert max(worst_change(ref, r0, sub(v, layers), layers).values()) > 1e-3  # per layer: earlier writers move


def test_update_cum_subspace_shared_and_optimizer_hook():
    space = random_subspace(D, tuple(range(L)), 3, seed=4)
    model = make_native(n_layers=L, d_model=D)
    w0 = snapshot(model)
    train(model, block(model, space, "update-cum", layers=[0, 2], shared=True))
    assert max(worst_change(model, w0, space, (0, 2), shared=True).values()) < 1e-5
    # a loop that never calls after_step: the projection runs as the optimizer's step post-hook
    model = make_native(n_layers=L, d_model=D)
    w0 = snapshot(model)
    opt = make_optimizer(model, ADAMW)
    data = Tokens(int(model.cfg.d_vocab))
    with block(model, space, "update-cum", optimizer=opt):
        for s in range(3):
            train_step(model, opt, data.batch(s), step=s)  # calls after_step too: idempotent
            opt.zero_grad()
            model(data.batch(s + 10).tokens, return_type="loss").backward()
            opt.step()  # the post-hook alone
    assert max(worst_change(model, w0, space, range(L)).values()) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "llama_untied"])
def test_update_cum_hf_families_including_tied_embeddings(arch, hf_model):
    """Conv1D (GPT-2), parallel blocks (NeoX), GQA, tied or not; fine-tuning in train mode (GPT-2 dropout on)."""
    model = hf_model(arch)
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model))
    tied = embeddings_tied(model)
    w0 = snapshot(model)
    train(model, block(model, v, "update-cum"))
    worst = worst_change(model, w0, sub(v), v.layers)
    assert "embed.weight" in worst and max(worst.values()) < 1e-5, worst
    assert embeddings_tied(model) == tied  # tied="keep": one matrix, so the unembedding's read of v is pinned too
    if tied:
        W_U = model.W_U.detach()  # [d_model, vocab], the same storage as the embedding
        W_U0 = w0["embed.weight"].T
        assert max((v[l].to(W_U) @ (W_U - W_U0)).abs().max().item() for l in v.layers) < 1e-5


def test_update_cum_untie_frees_the_unembedding_only(hf_model):
    model = hf_model("llama")
    assert embeddings_tied(model)
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model))
    U0 = model.W_U.detach().clone()
    w0 = snapshot(model)
    train(model, block(model, v, "update-cum", tied="untie"), steps=5)
    assert not embeddings_tied(model)
    assert max(worst_change(model, w0, sub(v), v.layers).values()) < 1e-5
    read = max((v[l] @ (model.W_U.detach() - U0)).abs().max().item() for l in v.layers)
    assert read > 1e-4  # the unembedding, now its own parameter, trains along v
    with pytest.raises(ConfigError, match="optimizer"):
        fresh = hf_model("llama")
        block(fresh, v, "update-cum", tied="untie", optimizer=make_optimizer(fresh, ADAMW))


def test_update_cum_state_round_trip_and_errors():
    model = make_native(n_layers=L, d_model=D)
    v = rand_direction(L, D)
    iv = block(model, v, "update-cum").attach()
    state = iv.state_dict()
    assert sorted(state) == sorted(w.label for w in residual_writers(model))
    iv.load_state_dict(state)
    with pytest.raises(ConfigError, match="another run"):
        iv.load_state_dict({"embed.weight": state["embed.weight"]})
    iv.remove()
    with pytest.raises(ConfigError, match="tied"):
        block(model, v, "update-cum", tied="share")
    assert iv.describe()["writers"] == len(state) and iv.describe()["span_dims"]["3"] == 1


@pytest.mark.parametrize("kind", ["native", "gpt2", "llama"])
def test_update_cum_under_adamw_the_residual_moves_along_v_l_only_through_the_reads(kind, hf_model):
    """At every token, the writer part of the motion of ``h_l`` along ``v_l`` is zero after AdamW with weight decay
    (embeddings, tied or not, included); the motion itself is not."""
    aligned, model = (make_native(n_layers=L, d_model=D), make_native(n_layers=L, d_model=D)) if kind == "native" \
        else (hf_model(kind), hf_model(kind))  # fmt: skip
    aligned.eval()
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model))
    train(model, block(model, v, "update-cum"))
    model.eval()
    toks = Tokens(int(model.cfg.d_vocab), batch=3, pos=8).batch(7).tokens
    res = writer_motion(aligned, model, toks, v)
    assert max(w for w, _ in res.values()) < 1e-4, res
    assert min(m for _, m in res.values()) > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_update_cum_with_lora_projects_the_adapter_update(arch, hf_model):
    """SafeLoRA-style: the writers' adapters keep U_j^T B = 0, so the adapted model's writes have no v_l part."""
    from reversion_lens.lora import apply_lora, lora_residual_writers

    aligned, model = hf_model(arch), hf_model(arch)
    apply_lora(model, r=4, alpha=8, target_modules=["attn.o", "mlp.out", "attn.q"])
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model))
    iv = block(model, v, "update-cum")
    assert iv.lora and len(iv.params) == 2 * int(model.cfg.n_layers)  # attn.o and mlp.out B's; attn.q is a read
    train(model, iv, optim=OptimConfig(lr=5e-2, weight_decay=0.05, grad_clip=None))
    for w in lora_residual_writers(model):
        assert w.B.abs().max() > 1e-3  # the adapters trained
        assert max((v[l] @ w.B).abs().max().item() for l in range(w.layer, int(model.cfg.n_layers))) < 1e-5
    model.eval()
    res = writer_motion(aligned, model, Tokens(int(model.cfg.d_vocab), batch=3, pos=8).batch(7).tokens, v)
    assert max(w for w, _ in res.values()) < 1e-4, res
    ref = hf_model(arch)  # the contrast: the per-layer update pins nothing once the base weights are frozen
    apply_lora(ref, r=4, alpha=8, target_modules=["attn.o", "mlp.out"])
    up = block(ref, v, "update")
    assert up.params == []


def test_update_cum_with_lora_refuses_other_trainable_parameters(hf_model):
    from reversion_lens.lora import apply_lora

    model = hf_model("llama")
    apply_lora(model, r=2, alpha=4, target_modules=["attn.o"])
    model.blocks[0].ln1.original_component.weight.requires_grad_(True)
    with pytest.raises(ConfigError, match="not covered"):
        block(model, rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model)), "update-cum")


def test_grad_cum_exact_has_both_guarantees_under_adamw():
    """grad-cum-exact: the writers' gradients projected (grad-cum's hooks) and their AdamW updates pinned exactly."""
    v = rand_direction(L, D)
    model = make_native(n_layers=L, d_model=D)
    loss_backward(model, "grad-cum-exact", v)
    assert max(worst_gradient(model, sub(v), v.layers).values()) < 1e-6
    model = make_native(n_layers=L, d_model=D)
    w0 = snapshot(model)
    iv = block(model, v, "grad-cum-exact")
    with iv:
        assert iv.hook_count == 1 + 2 * L
    train(model, iv)
    assert max(worst_change(model, w0, sub(v), v.layers).values()) < 1e-5
