"""Batched greedy decoding: left-padded batches match one-prompt-at-a-time decoding; stop and length limits."""

import jaxtyping
import pytest
import torch
from conftest import make_native, random_seqs

from reversion_lens.errors import ShapeError
from reversion_lens.generation import greedy_generate
from reversion_lens.probes import pad_sequences


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
    before = toks.clone()
    greedy_generate(model, toks, mask, 2)
    assert torch.equal(toks, before)  # inputs are not modified
