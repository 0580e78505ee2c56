"""``orthogonalize`` as an arm: a permanent edit at attach after which no layer writes or carries ``r``.

The guarantee measured: right after attaching, ``max |h . r|`` at every resid_pre, resid_post, attn_out and
mlp_out of every position is below 1e-4 (float32; activations are O(1)); it stays after ``remove``; tied
embeddings are untied by default (the unembedding keeps its own, unedited copy) or edited together (``keep``).
"""

import pytest
import torch
from conftest import make_native
from modes_helpers import rand_direction

from reversion_lens.errors import ConfigError
from reversion_lens.interventions import block
from reversion_lens.interventions.everywhere import shared_vector
from reversion_lens.orthogonalize import embeddings_tied

L, D = 3, 32
SITES = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")


def worst_component(model, r):
    toks = torch.randint(4, int(model.cfg.d_vocab), (3, 9), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith(SITES))
    return max((cache[k] @ r.to(cache[k])).abs().max().item() for k in cache), len(cache)


@pytest.mark.parametrize("kind", ["native", "gpt2", "neox", "llama", "llama_untied"])
def test_orthogonalize_arm_no_site_carries_r_and_the_edit_is_permanent(kind, hf_model):
    model = make_native(n_layers=L, d_model=D) if kind == "native" else hf_model(kind)
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model))
    r = shared_vector(v)
    before, _ = worst_component(model, r)
    tied = embeddings_tied(model)
    iv = block(model, v, "orthogonalize")
    assert iv.edits_weights and not iv.edited
    with iv:
        pass
    assert iv.edited and iv.hook_count == 0 and not iv.attached
    after, n = worst_component(model, r)  # after remove: still edited
    assert before > 1e-2 and after < 1e-4 and n >= 4 * int(model.cfg.n_layers)
    assert not embeddings_tied(model)  # tied="untie" (default) leaves them untied; untied ones stay so
    if tied:
        assert (model.W_U.detach().T @ r).abs().max() > 1e-3  # the unembedding still reads r


def test_orthogonalize_keep_tied_edits_the_shared_matrix(hf_model):
    model = hf_model("llama")
    v = rand_direction(int(model.cfg.n_layers), int(model.cfg.d_model), layers=[2])
    r = shared_vector(v)
    with block(model, v, "orthogonalize", tied="keep"):
        pass
    assert embeddings_tied(model)
    assert (model.W_U.detach().T @ r).abs().max() < 1e-5  # one matrix: the unembedding cannot read r either
    with pytest.raises(ConfigError, match="tied"):
        block(model, v, "orthogonalize", tied="share")
