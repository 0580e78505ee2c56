"""``grad-everywhere``: one vector out of the gradient at every layer's resid_pre, attn_out and mlp_out.

The guarantee measured: ``max |r^T dL/dW|`` over every residual-writing weight of every layer (and the untied
embeddings), and ``max |g . r|`` of the trunk gradient leaving every ``resid_pre`` hook, below 1e-6 (float32).
"""

import pytest
import torch
from conftest import make_native
from modes_helpers import components, rand_direction

from reversion_lens.directions import random_subspace
from reversion_lens.errors import ConfigError, DirectionError
from reversion_lens.interventions import block
from reversion_lens.interventions.everywhere import shared_vector
from reversion_lens.orthogonalize import embeddings_tied, residual_writers

L, D = 4, 32


def test_shared_vector_is_the_normalised_mean_or_one_layers_vector():
    v = rand_direction(L, D)
    r = shared_vector(v)
    mean = v.vectors.double().mean(0)
    torch.testing.assert_close(r.double(), mean / mean.norm(), atol=1e-7, rtol=0)
    torch.testing.assert_close(shared_vector(v.select([2])), v[2], atol=1e-7, rtol=0)
    from reversion_lens.directions import Direction

    opposite = Direction.from_vectors(torch.stack([v[0], -v[0]]), (0, 1))
    with pytest.raises(DirectionError, match="cancel"):
        shared_vector(opposite)


def _trunk_grads(model):
    """Capture the gradient leaving every resid_pre hook point (its input's gradient, after any projection)."""
    got, handles = {}, []
    for layer in range(int(model.cfg.n_layers)):
        hp = model.hook_dict[f"blocks.{layer}.hook_resid_pre"]

        def pre(mod, args, layer=layer):
            if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                args[0].register_hook(lambda g: got.__setitem__(layer, g))

        handles.append(hp.register_forward_pre_hook(pre))
    return got, handles


@pytest.mark.parametrize("kind", ["native", "gpt2", "neox", "llama", "llama_untied"])
def test_grad_everywhere_writers_and_trunk_have_no_r_gradient(kind, hf_model):
    model = make_native(n_layers=L, d_model=D) if kind == "native" else hf_model(kind)
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model), layers=[1])  # @1: layer 1's vector alone
    r = shared_vector(v)
    toks = torch.randint(4, int(model.cfg.d_vocab), (3, 9), generator=torch.Generator().manual_seed(0))
    got, handles = _trunk_grads(model)
    try:
        with block(model, v, "grad-everywhere") as iv:
            assert iv.hook_count == 3 * int(model.cfg.n_layers)
            model(toks, return_type="loss").backward()
    finally:
        for h in handles:
            h.remove()
    tied = embeddings_tied(model)
    worst = {w.label: components(w.parameter.grad, r, w.axis).abs().max().item() for w in residual_writers(model)
             if not (tied and w.label == "embed.weight")}  # fmt: skip
    assert max(worst.values()) < 1e-6, worst
    assert len(got) == int(model.cfg.n_layers)
    assert max((g @ r.to(g)).abs().max().item() for g in got.values()) < 1e-6
    assert max(g.abs().max().item() for g in got.values()) > 1e-4


def test_grad_everywhere_refuses_a_subspace():
    model = make_native(n_layers=L, d_model=D)
    with pytest.raises(ConfigError, match="grad-shared"):
        block(model, random_subspace(D, tuple(range(L)), 2, seed=0), "grad-everywhere")
