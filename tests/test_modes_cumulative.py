"""``grad-cum`` / ``grad-shared``: every writer at or before a blocked layer gets no gradient along that layer's v_rev.

The guarantee measured: ``max |u^T dL/dW|`` along ``d_model`` over every residual-writing weight ``W`` of layer
``j`` (the embeddings: ``j = -1``) and every ``u`` in the (sub)space of a blocked layer ``l >= j``. The per-layer
``grad`` block does not give it (earlier layers' writes keep their ``v_l`` gradient): the contrast is asserted.
"""

import pytest
import torch
from conftest import make_native
from modes_helpers import Tokens, components, loss_backward, rand_direction, sub, worst_gradient, writer_motion

from reversion_lens.directions import random_subspace
from reversion_lens.interventions import block
from reversion_lens.interventions.cumulative import EMBED, cumulative_spans
from reversion_lens.interventions.update import writer_layer
from reversion_lens.orthogonalize import embeddings_tied, residual_writers
from reversion_lens.training import OptimConfig, finetune

L, D = 4, 32


def test_cumulative_spans_contain_exactly_the_later_layers():
    sub = random_subspace(D, (1, 3), 2, seed=0)
    spans = cumulative_spans(sub, L)
    assert sorted(spans) == [EMBED, 0, 1, 2, 3]
    assert {j: b.shape[0] for j, b in spans.items()} == {EMBED: 4, 0: 4, 1: 4, 2: 2, 3: 2}
    for j, b in spans.items():
        torch.testing.assert_close(b @ b.T, torch.eye(b.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
        for layer in (1, 3):  # rows of a layer >= j lie in the span; rows of earlier layers need not
            inside = (sub[layer].double() @ b.T).norm(dim=1)
            assert (inside > 1 - 1e-6).all() == (layer >= j)
    shared = cumulative_spans(sub, L, shared=True)
    assert sorted(shared) == [EMBED, 0, 1, 2, 3] and all(b.shape[0] == 4 for b in shared.values())


@pytest.mark.parametrize("blocked", [None, (1, 2)])
def test_grad_cum_native_every_earlier_writer_has_no_v_gradient_where_grad_does(blocked):
    v = rand_direction(L, D)
    layers = blocked or tuple(range(L))
    model = make_native(n_layers=L, d_model=D)
    loss_backward(model, "grad-cum", v, blocked)
    worst = worst_gradient(model, sub(v, layers), layers)
    assert max(worst.values()) < 1e-6, worst
    assert min(abs(model.blocks[0].mlp.out.original_component.weight.grad).max().item(), 1) > 1e-4  # real gradients
    # the per-layer block leaves the v_l gradient of the earlier layers' writers (and the embeddings) free
    ref = make_native(n_layers=L, d_model=D)
    loss_backward(ref, "grad", v, blocked)
    per_layer = worst_gradient(ref, sub(v, layers), layers)
    assert max(per_layer.values()) > 1e-3


def test_grad_cum_with_a_subspace_and_grad_shared():
    model = make_native(n_layers=L, d_model=D)
    space = random_subspace(D, tuple(range(L)), 3, seed=2)
    loss_backward(model, "grad-cum", space, (0, 2))
    assert max(worst_gradient(model, space, (0, 2)).values()) < 1e-6
    model = make_native(n_layers=L, d_model=D)
    loss_backward(model, "grad-shared", space, (0, 2))
    worst = worst_gradient(model, space, (0, 2), shared=True)  # also layer 3's writers avoid layers 0 and 2
    assert max(worst.values()) < 1e-6 and "blocks.3.mlp.out.weight" in worst


def test_grad_cum_under_sgd_keeps_v_of_earlier_writers_and_not_under_adamw():
    """SGD without weight decay: v_l^T W of every writer of a layer <= l stays at its aligned value; AdamW: it moves."""
    v = rand_direction(L, D)
    space = sub(v, range(L))
    drift = {}
    for name, optim in (("sgd", OptimConfig(optimizer="sgd", lr=0.5, weight_decay=0.0, grad_clip=None)),
                        ("adamw", OptimConfig(lr=1e-2, weight_decay=0.01, grad_clip=None))):  # fmt: skip
        model = make_native(n_layers=L, d_model=D)
        w0 = {w.label: w.parameter.detach().clone() for w in residual_writers(model)}
        finetune(
            model,
            Tokens(int(model.cfg.d_vocab)),
            4,
            optim=optim,
            interventions=[block(model, v, "grad-cum")],
            progress=False,
        )
        drift[name] = max(components(w.parameter.detach() - w0[w.label], u, w.axis).abs().max().item()
                          for w in residual_writers(model) for layer in range(max(writer_layer(w.label), 0), L)
                          for u in space[layer])  # fmt: skip
    assert drift["sgd"] < 1e-5
    assert drift["adamw"] > 1e-3  # a projected gradient is not a projected AdamW update (use update-cum)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "llama_untied"])
def test_grad_cum_hf_families(arch, hf_model):
    """Every family: writers exact; a tied embedding is not (the unembedding's gradient reaches it unprojected)."""
    model = hf_model(arch)
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model))
    layers = v.layers
    loss_backward(model, "grad-cum", v)
    tied = embeddings_tied(model)
    worst = worst_gradient(model, sub(v, layers), layers, skip=("embed",) if tied else ())
    assert max(worst.values()) < 1e-6, worst
    if tied:
        emb = next(w for w in residual_writers(model) if w.label == "embed.weight")
        gap = max(components(emb.parameter.grad, v[l], emb.axis).abs().max().item() for l in layers)
        assert gap > 1e-4  # the documented gap: use update-cum for tied embeddings
    assert arch != "llama_untied" or not tied


def test_grad_cum_paused_and_hooks_removed():
    model = make_native(n_layers=L, d_model=D)
    v = rand_direction(L, D)
    before = sum(len(hp.bwd_hooks) for hp in {id(h): h for h in model.hook_dict.values()}.values())
    iv = block(model, v, "grad-cum").attach()
    assert iv.hook_count == 1 + 2 * L  # resid_pre of layer 0 + attn_out and mlp_out of every layer
    toks = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with iv.paused():
        model(toks, return_type="loss").backward()
    assert max(worst_gradient(model, sub(v, range(L)), range(L)).values()) > 1e-3  # paused: no projection
    iv.remove()
    after = sum(len(hp.bwd_hooks) for hp in {id(h): h for h in model.hook_dict.values()}.values())
    assert after == before and iv.describe()["span_dims"]["-1"] == L


def test_grad_cum_under_sgd_the_residual_moves_along_v_l_only_through_the_reads():
    """The activation statement: after SGD steps, at every token, the writer part of the motion of ``h_l`` along ``v_l``
    is zero; the motion itself is not (it comes through the reads). The per-layer ``grad`` leaves a writer part."""
    v = rand_direction(L, D)
    sgd = OptimConfig(optimizer="sgd", lr=0.5, weight_decay=0.0, grad_clip=None)
    toks = torch.randint(0, 40, (3, 8), generator=torch.Generator().manual_seed(5))
    res = {}
    for mode in ("grad-cum", "grad"):
        aligned, model = make_native(n_layers=L, d_model=D), make_native(n_layers=L, d_model=D)
        finetune(model, Tokens(40), 4, optim=sgd, interventions=[block(model, v, mode)], progress=False)
        res[mode] = writer_motion(aligned, model, toks, v)
    assert max(w for w, _ in res["grad-cum"].values()) < 1e-5
    assert min(m for _, m in res["grad-cum"].values()) > 1e-3  # the reads still move it
    assert max(w for w, _ in res["grad"].values()) > 1e-3
