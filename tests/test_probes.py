"""ProbeSet: validation, padding and masks, read weights, hashing, and the vocabulary check."""

import pytest
import torch

import reversion_lens as rl
from reversion_lens.errors import ProbeError
from reversion_lens.tracking import DriftTracker

V = 40


def test_probe_validation():
    with pytest.raises(ProbeError, match="empty"):
        rl.ProbeSet.from_tokens([])
    with pytest.raises(ProbeError, match="no tokens"):
        rl.ProbeSet.from_tokens([[1, 2], []])
    left = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(ProbeError, match="left-padded.*attention_mask"):
        rl.ProbeSet.from_tokens(left, pad_id=0)
    with pytest.raises(ProbeError, match="holes"):
        rl.ProbeSet(torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1]]))
    p = rl.ProbeSet.from_tokens([[1, 2, 3]])
    with pytest.raises(ProbeError, match="outside the model's vocabulary"):
        p.check_vocab(3)


def test_read_weights_last_mean_span():
    p = rl.ProbeSet.from_tokens([[1, 2, 3], [4, 5]], padding_side="left")
    assert p.last_positions().tolist() == [2, 2]
    m = rl.ProbeSet.from_tokens([[1, 2, 3], [4, 5]], padding_side="right", read="mean")
    assert torch.allclose(m.read_weights(), torch.tensor([[1 / 3] * 3, [0.5, 0.5, 0]]))
    s = rl.ProbeSet.from_tokens([[1, 2, 3], [4, 5]], padding_side="left", read="span", span=(-2, None))
    assert torch.allclose(s.read_weights(), torch.tensor([[0, 0.5, 0.5], [0, 0.5, 0.5]]))
    # the hash ignores padding side and is sensitive to content
    assert p.hash() == rl.ProbeSet.from_tokens([[1, 2, 3], [4, 5]]).hash()
    assert p.hash() != rl.ProbeSet.from_tokens([[1, 2, 3], [4, 6]]).hash()


def test_empty_probe_sets():
    for make in (
        lambda: rl.ProbeSet(torch.zeros((0, 4), dtype=torch.long), torch.zeros((0, 4), dtype=torch.long)),
        lambda: rl.ProbeSet(torch.zeros((2, 0), dtype=torch.long), torch.zeros((2, 0), dtype=torch.long)),
        lambda: rl.ProbeSet.from_tokens(torch.zeros((0, 5), dtype=torch.long)),
    ):
        with pytest.raises(ProbeError, match="the probe set is empty; give at least one prompt"):
            make()
    with pytest.raises(ProbeError, match="prompt 1 has no real tokens.*drop it or fix its mask"):
        rl.ProbeSet(torch.ones((2, 3), dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_token_ids_outside_the_vocabulary_fail_before_any_forward_pass(tiny_model, world):
    _, base, aligned, v = world
    ran = []
    tiny_model.blocks[0].hook_in.add_hook(lambda x, hook: ran.append(1))
    probes = rl.ProbeSet.from_tokens([[1, 2, 3], [4, V, 5]])
    with pytest.raises(
        ProbeError, match=rf"token id {V} \(prompt 1, position 1\) is outside the model's vocabulary of {V}"
    ):
        rl.residual_stats(tiny_model, probes)
    with pytest.raises(ProbeError, match="tokenised for a different model"):
        DriftTracker(probes, v, aligned, base)(1, tiny_model)
    assert ran == []
    tiny_model.reset_hooks()
    with pytest.raises(ProbeError, match="non-negative"):
        rl.ProbeSet.from_tokens(torch.tensor([[1, -2, 3]]))
    # padding is masked but still embedded: a pad id beyond the vocabulary is refused too, with the fix
    padded = rl.ProbeSet.from_tokens([[1, 2, 3], [4]], pad_id=V + 10)
    with pytest.raises(
        ProbeError, match=rf"pad id {V + 10} \(prompt 1, position 1\).*Pad with an id inside the vocabulary"
    ):
        rl.residual_stats(tiny_model, padded)
    assert ran == []


def test_padding_without_a_mask_is_refused():
    left = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(ProbeError, match="look left-padded.*Pass attention_mask"):
        rl.ProbeSet.from_tokens(left, pad_id=0)
    right = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]])
    with pytest.raises(ProbeError, match="look right-padded.*pad tokens would be read.*Pass attention_mask"):
        rl.ProbeSet.from_tokens(right, pad_id=0)
    # with the mask both are fine and read the same last tokens
    for toks in (left, right):
        p = rl.ProbeSet.from_tokens(toks, attention_mask=(toks != 0).long())
        assert p.tokens[torch.arange(2), p.last_positions()].tolist() == [6, 10]
