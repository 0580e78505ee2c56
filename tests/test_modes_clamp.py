"""``clamp`` at every layer (its default: all the direction's layers), on every Hugging Face family.

What it does with all layers: a forward hook at each layer's ``resid_post`` sets the component along that
layer's own ``v_l`` to the frozen reference's on the same input, and its Jacobian ``I - v_l v_l^T`` zeroes the
``v_l`` gradient flowing back through that point. The guarantee measured: while attached, through AdamW
training, ``max |h_l . v_l - h_ref,l . v_l|`` over every layer and position is below 1e-4 (float32); the bare
(paused) weights are not held (they drift along v_l).
"""

import pytest
import torch
from conftest import make_native
from modes_helpers import Tokens, rand_direction

from reversion_lens.interventions import block
from reversion_lens.training import OptimConfig, finetune


def components(model, toks, v):
    got = {}
    hooks = [(f"blocks.{l}.hook_resid_post", lambda x, hook, l=l: got.__setitem__(l, x.detach() @ v[l].to(x)))
             for l in v.layers]  # fmt: skip
    with model.hooks(fwd_hooks=hooks):
        model(toks)
    return torch.stack([got[l] for l in v.layers])


@pytest.mark.parametrize("kind", ["native", "gpt2", "neox", "llama", "llama_untied"])
def test_clamp_pins_every_layer_through_training_and_the_bare_weights_drift(kind, hf_dirs_modes):
    if kind == "native":
        model, ref = make_native(n_layers=4), make_native(n_layers=4)
    else:
        from transformer_lens import TransformerBridge

        model, ref = (TransformerBridge.boot_transformers(str(hf_dirs_modes[kind]), device="cpu") for _ in range(2))
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model))
    iv = block(model, v, "clamp", reference_model=ref)
    assert iv.layers == v.layers  # every layer by default
    data = Tokens(int(model.cfg.d_vocab))
    finetune(model, data, 4, optim=OptimConfig(lr=1e-2, grad_clip=None), interventions=[iv], progress=False)
    toks = data.batch(99).tokens
    target = components(ref, toks, v)
    with iv:
        held = components(model, toks, v)
        with iv.paused():
            bare = components(model, toks, v)
    assert (held - target).abs().max() < 1e-4
    assert (bare - target).abs().max() > 1e-2  # the clamp holds only while it is attached
