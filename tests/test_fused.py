"""The speed paths: the fused training forward of toy histories and padding short batches to 16 columns.

Both must change nothing but speed: same logits, same gradients, same greedy responses.
"""

import pytest
import torch
from conftest import make_native, random_seqs

from reversion_lens.directions import random_direction
from reversion_lens.interventions import block
from reversion_lens.probes import pad_sequences
from reversion_lens.toyworld import ToyConfig, ToyData
from reversion_lens.toyworld.fused import fused_lm_loss, fused_logits, supports_fused
from reversion_lens.toyworld.language import FAST_WIDTH
from reversion_lens.training import lm_loss


def toy_model(positional: str, seed: int = 0):
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_native(ToyConfig.preset("tiny", positional=positional).model_config(seed))


def widen(toks, mask, side: str, width: int = FAST_WIDTH):
    """Pad on ``side`` to ``width`` columns (mask 0)."""
    extra = (width - toks.shape[1], 0) if side == "left" else (0, width - toks.shape[1])
    return torch.nn.functional.pad(toks, extra), torch.nn.functional.pad(mask, extra)


def grads(model, loss_fn, batch) -> list[torch.Tensor]:
    model.zero_grad()
    loss_fn(model, batch).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("positional", ["standard", "rotary"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_logits_equal_the_bridge_at_real_positions(positional, side):
    model = toy_model(positional)
    assert supports_fused(model)
    batch = ToyData(ToyConfig().language(), "pretrain", 24, seed=1).batch(0)
    rows = [r[: int(m.sum())] for r, m in zip(batch.tokens.tolist(), batch.attention_mask)]
    toks, mask = widen(*pad_sequences(rows, 0, side), side)
    with torch.no_grad():
        ref, ours = model(toks, attention_mask=mask), fused_logits(model, toks, mask)
    real = mask.bool()
    assert torch.isfinite(ours).all()
    assert (ref[real] - ours[real]).abs().max() < 1e-5 * ref[real].abs().max()


@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_fused_gradients_equal_the_bridge(positional):
    model = toy_model(positional, seed=3)
    batch = ToyData(ToyConfig().language(), "pretrain", 32, seed=0).batch(2)
    ref, ours = grads(model, lm_loss, batch), grads(model, fused_lm_loss, batch)
    scale = max(g.abs().max() for g in ref)
    assert scale > 0 and max((a - b).abs().max() for a, b in zip(ref, ours)) < 1e-5 * scale


def test_fused_trains_the_bridges_own_parameters():
    model = toy_model("standard")
    before = [p.detach().clone() for p in model.parameters()]
    fused_lm_loss(model, ToyData(ToyConfig().language(), "pretrain", 8, seed=0).batch(0)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_hooked_or_unsupported_models_take_the_bridge_forward():
    model = toy_model("standard")
    batch = ToyData(ToyConfig().language(), "pretrain", 16, seed=0).batch(0)
    v = random_direction(48, layers=[0, 1], seed=0)
    with block(model, v, "grad"):  # a hook the fused path would skip: it must not be used
        assert not supports_fused(model)
        with pytest.raises(ValueError, match="no hooks"):
            fused_logits(model, batch.tokens, batch.attention_mask)
        blocked = grads(model, fused_lm_loss, batch)
        assert all(torch.equal(a, b) for a, b in zip(blocked, grads(model, lm_loss, batch)))
    assert supports_fused(model)  # hooks gone with the block
    assert not any(torch.equal(a, b) for a, b in zip(blocked, grads(model, fused_lm_loss, batch)) if a.abs().sum() > 0)
    for unsupported in (make_native(attn_only=True), make_native(normalization_type="RMS")):
        assert not supports_fused(unsupported)
        b = ToyData(ToyConfig().language(), "pretrain", 4, seed=0).batch(0)
        assert torch.equal(fused_lm_loss(unsupported, b), lm_loss(unsupported, b))


# ---------------------------------------------------------------- padding training batches to FAST_WIDTH
def test_training_batches_are_padded_within_the_context():
    assert ToyConfig().batch_width == FAST_WIDTH and ToyConfig(n_ctx=12, max_len=3).batch_width == 12
    b = ToyData(ToyConfig().language(), "benign", 4, seed=0).batch(0)
    assert b.tokens.shape[1] == FAST_WIDTH and b.attention_mask[:, -1].sum() == 0 and b.loss_mask[:, -1].sum() == 0
    assert ToyData(ToyConfig().language(), "benign", 4, seed=0, width=0).batch(0).tokens.shape[1] < FAST_WIDTH


@pytest.mark.parametrize("side", ["left", "right"])
def test_wider_padding_changes_no_real_logit(side):
    model = make_native(seed=4)
    narrow, nmask = pad_sequences(random_seqs(12, lo=3, hi=10, seed=2), 0, side)
    wide, wmask = widen(narrow, nmask, side)
    with torch.no_grad():
        a, b = model(narrow, attention_mask=nmask), model(wide, attention_mask=wmask)
    assert (a[nmask.bool()] - b[wmask.bool()]).abs().max() < 1e-5
