"""ProbeSet.batches groups prompts by length; every consumer gets the results of in-order batching."""

import itertools

import pytest
import torch
from conftest import make_native

import reversion_lens as rl


def varied_seqs(n: int = 23, vocab: int = 40, seed: int = 0) -> list[list[int]]:
    """Lengths from 1 to 30 (n_ctx 32), shuffled, with repeats (ties exercise the stable sort)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 30, 2, 29, 7, 7, 7, 15, 3, 30, 1, 12, 25, 4, 18, 9, 9, 22, 5, 27, 11, 2, 16][:n]
    perm = torch.randperm(len(lengths), generator=g).tolist()
    return [torch.randint(1, vocab, (lengths[i],), generator=g).tolist() for i in perm]


@pytest.fixture(scope="module")
def model():
    return make_native(n_layers=3, d_model=32, d_vocab=40, seed=4)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 4, 5, 23, 64])
def test_batches_are_length_groups_covering_every_row_once(side, batch_size):
    probes = rl.ProbeSet.from_tokens(varied_seqs(), padding_side=side)
    lengths = probes.lengths
    batches = list(probes.batches(batch_size))
    # (b) every row exactly once
    seen = torch.cat([b.index for b in batches])
    assert sorted(seen.tolist()) == list(range(len(probes)))
    assert all(len(b.index) <= batch_size for b in batches)
    assert [len(b.index) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    for b in batches:
        # rows of a batch keep their probe-set order; each row is the probe set's row, trimmed
        assert b.index.tolist() == sorted(b.index.tolist())
        # (a) each batch is exactly as wide as its longest prompt
        assert b.tokens.shape[1] == int(lengths[b.index].max()) == int(b.attention_mask.sum(1).max())
        assert torch.equal(b.attention_mask.sum(1), lengths[b.index])
        full_w = probes.read_weights()[b.index]
        assert torch.equal(b.weights.sum(1), full_w.sum(1))
        for row, i in enumerate(b.index.tolist()):
            real = probes.tokens[i][probes.attention_mask[i].bool()]
            assert torch.equal(b.tokens[row][b.attention_mask[row].bool()], real)
    # (a) lengths are sorted across batches: no batch holds a prompt longer than any prompt of a later batch
    if len(batches) > 1:
        for a, b in itertools.pairwise(batches):
            assert int(lengths[a.index].max()) <= int(lengths[b.index].min())
    else:  # one batch: the probe set in order
        assert batches[0].index.tolist() == list(range(len(probes)))


def test_stable_sort_and_in_order_option():
    probes = rl.ProbeSet.from_tokens([[1] * k for k in (3, 1, 3, 2, 1, 3)])
    assert [b.index.tolist() for b in probes.batches(2)] == [[1, 4], [0, 3], [2, 5]]
    assert [b.index.tolist() for b in probes.batches(2, by_length=False)] == [[0, 1], [2, 3], [4, 5]]
    assert [b.index.tolist() for b in probes.batches(6)] == [[0, 1, 2, 3, 4, 5]]
    # 13 real tokens; in order every batch is 3 wide (18 positions), grouped they are 1, 3 and 3 wide (14)
    assert probes.padded_fraction(2, by_length=False) == pytest.approx(1 - 13 / 18)
    assert probes.padded_fraction(2) == pytest.approx(1 - 13 / 14)


@pytest.mark.parametrize("read", ["last", "mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_residual_stats_grouped_equal_one_prompt_at_a_time(model, read, side):
    """(c) Grouped batches of very varied lengths give the one-row-at-a-time statistics, in probe-set order."""
    probes = rl.ProbeSet.from_tokens(varied_seqs(), padding_side=side, read=read)
    kw = dict(second_moments=True, keep_per_prompt=True)
    grouped = rl.residual_stats(model, probes, batch_size=4, **kw)
    single = rl.residual_stats(model, probes, batch_size=1, **kw)  # no padding at all
    in_order = rl.residual_stats(model, probes, batch_size=len(probes), **kw)  # one batch, the old order
    assert grouped.count == single.count == len(probes)
    torch.testing.assert_close(grouped.per_prompt, single.per_prompt, atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped.per_prompt, in_order.per_prompt, atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped.mean, single.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped.second, single.second, atol=1e-5 * len(probes), rtol=1e-6)
    # per-prompt vectors are in probe-set order: prompt i alone, unpadded
    for i in (0, 5, len(probes) - 1):
        alone = rl.residual_stats(model, probes.subset([i]), keep_per_prompt=True)
        torch.testing.assert_close(grouped.per_prompt[i], alone.per_prompt[0], atol=1e-6, rtol=0)
    # the accumulators are float64: the grouped sums are the sums of the kept vectors to float64 rounding
    assert grouped.sum.dtype == grouped.second.dtype == torch.float64
    pp = grouped.per_prompt.double()
    torch.testing.assert_close(grouped.sum, pp.sum(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grouped.second, torch.einsum("pld,ple->lde", pp, pp), atol=1e-10, rtol=1e-12)


def test_kl_to_reference_is_order_independent(model):
    from reversion_lens.evaluation import kl_to_reference

    probes = rl.ProbeSet.from_tokens(varied_seqs(), padding_side="left")
    other = make_native(n_layers=3, d_model=32, d_vocab=40, seed=5)
    grouped = kl_to_reference(other, model, probes, batch_size=4)
    single = kl_to_reference(other, model, probes, batch_size=1)
    assert grouped == pytest.approx(single, rel=1e-5)


def test_penalty_keeps_probe_set_order(model):
    """The penalty mode cycles through its probe batches step by step: their composition must not change."""
    from reversion_lens.interventions.penalty import Penalty

    probes = rl.ProbeSet.from_tokens(varied_seqs(), padding_side="left")
    st = rl.residual_stats(model, probes)
    v = rl.directions.mean_difference(st, rl.residual_stats(make_native(n_layers=3, d_model=32, seed=6), probes))
    pen = Penalty(model, v, None, probes=probes, reference=st, batch_size=5)
    try:
        assert [b.index.tolist() for b in pen._batches] == [list(range(s, min(s + 5, 23))) for s in range(0, 23, 5)]
    finally:
        pen.remove()
