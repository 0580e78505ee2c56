"""Contrastive directions on one checkpoint, and ranking layers by separation or by a per-prompt score."""

import itertools

import numpy as np
import pytest
import torch
from conftest import make_native, random_seqs

import reversion_lens as rl
from reversion_lens.contrastive import (
    auroc,
    contrastive_direction,
    contrastive_stats,
    projections,
    rank_layers,
    rank_layers_by_score,
    standardized_mean_difference,
)
from reversion_lens.directions import ESTIMATORS, Direction, mean_difference
from reversion_lens.errors import ConfigError, DirectionError, ShapeError


def _sets():
    pos = rl.ProbeSet.from_tokens(random_seqs(6, seed=1), name="harmful")
    neg = rl.ProbeSet.from_tokens(random_seqs(6, seed=2), name="harmless", padding_side="left")
    return pos, neg


def test_contrastive_direction_on_one_checkpoint(tiny_model):
    pos, neg = _sets()
    v = contrastive_direction(tiny_model, pos, neg, site="resid_pre", layers=[1, 2], meta={"checkpoint": "aligned"})
    means = []
    for probes in (pos, neg):  # the oracle: one prompt at a time, last token
        rows = []
        for i in range(len(probes)):
            toks = probes.tokens[i][probes.attention_mask[i].bool()][None]
            _, cache = tiny_model.run_with_cache(toks)
            rows.append(torch.stack([cache[f"blocks.{layer}.hook_resid_pre"][0, -1] for layer in (1, 2)]))
        means.append(torch.stack(rows).double().mean(0))
    diff = means[0] - means[1]
    torch.testing.assert_close(v.vectors.double(), diff / diff.norm(dim=1, keepdim=True), atol=1e-5, rtol=0)
    assert v.site == "resid_pre" and v.layers == (1, 2)
    assert v.provenance["probes"] == [pos.describe(), neg.describe()]  # both probe sets
    assert v.provenance["contrast"] == {"positive": "harmful", "negative": "harmless"}
    assert v.provenance["checkpoints"] == ["aligned", "aligned"]
    for name in ESTIMATORS.names():  # every estimator runs on two probe sets of one model
        d = contrastive_direction(tiny_model, pos, neg, name)
        assert d.provenance["method"] == name and d.layers == (0, 1, 2)
    with pytest.raises(ConfigError, match="unknown method 'svm'"):
        contrastive_direction(tiny_model, pos, neg, "svm")


def test_contrastive_stats_keep_prompts(tiny_model):
    pos, neg = _sets()
    a, b = contrastive_stats(tiny_model, pos, neg, layers=[0])
    assert a.per_prompt.shape == (6, 1, 32) and b.meta["contrast"] == "negative"
    assert a.meta["probes"]["hash"] == pos.hash() and b.meta["probes"]["hash"] == neg.hash()
    direct = contrastive_direction(tiny_model, pos, neg, layers=[0])
    torch.testing.assert_close(mean_difference(a, b, same_probes=False).vectors, direct.vectors, atol=0, rtol=0)


def test_auroc_and_smd_by_hand():
    p, n = [0.3, 1.2, 2.0, 0.5], [0.1, 0.5, -1.0]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(p, n)]
    assert auroc(p, n) == pytest.approx(np.mean(pairs), abs=1e-12)
    pooled = ((len(p) - 1) * np.var(p, ddof=1) + (len(n) - 1) * np.var(n, ddof=1)) / (len(p) + len(n) - 2)
    assert standardized_mean_difference(p, n) == pytest.approx((np.mean(p) - np.mean(n)) / pooled**0.5, abs=1e-12)


def _layered_sets(seed=0):
    """Per-prompt vectors [prompt, layer, d]: layer 2 separates the sets cleanly, layer 1 weakly, layer 0 not at all."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(40, 3, 8, generator=g), torch.randn(40, 3, 8, generator=g)
    a[:, 1, 0] += 0.8
    a[:, 2, 0] += 6.0
    stats = [rl.ResidStats(x.double().sum(0), 40, (0, 1, 2), "resid_post", per_prompt=x) for x in (a, b)]
    return stats[0], stats[1]


def test_rank_layers_held_out():
    pos, neg = _layered_sets()
    table = rank_layers(pos, neg, holdout=0.25, seed=0)
    assert table.layer.tolist() == [2, 1, 0] and table["rank"].tolist() == [1, 2, 3]
    assert table.auroc.iloc[0] == 1.0 and table.auroc.iloc[2] < 0.8
    assert (table.n_fit == 60).all() and (table.n_test == 20).all()
    assert table.smd.iloc[0] > table.smd.iloc[1]
    assert table.equals(rank_layers(pos, neg, holdout=0.25, seed=0))  # seeded
    # held out means unseen: pure noise in 32 dimensions, 15 + 15 prompts to fit on, is separated perfectly in
    # sample by logistic regression and not at all on the held-out prompts
    g = torch.Generator().manual_seed(5)
    noise = [torch.randn(20, 1, 32, generator=g) for _ in range(2)]
    a, b = (rl.ResidStats(x.double().sum(0), 20, (0,), "resid_post", per_prompt=x) for x in noise)
    over = rank_layers(a, b, "logistic", holdout=0.25, seed=0, l2=1e-4)
    assert over.train_auroc[0] == 1.0 and over.auroc[0] < 0.9
    in_sample = rank_layers(pos, neg, holdout=0.0, method="logistic")
    assert (in_sample.auroc == in_sample.train_auroc).all() and (in_sample.n_test == 80).all()
    with pytest.raises(ConfigError, match="holdout"):
        rank_layers(pos, neg, holdout=1.0)
    # a layer where both sets read the same vector (a chat template's last token at layer 0) has no direction
    same = [rl.ResidStats(s.sum, s.count, s.layers, s.site, per_prompt=s.per_prompt.clone()) for s in (pos, neg)]
    for s in same:
        s.per_prompt[:, 0] = 1.0
        s.sum[0] = float(s.count)
    with pytest.raises(DirectionError, match=r"zero norm at layer\(s\) \[0\].*layers=\[\.\.\.\]"):
        rank_layers(*same)
    assert rank_layers(*same, layers=[1, 2]).layer.tolist() == [2, 1]


def test_rank_layers_by_score():
    pos, neg = _layered_sets(seed=1)
    v = Direction.from_vectors(torch.eye(8)[0].expand(3, 8))
    x = torch.cat([pos.per_prompt, neg.per_prompt])
    stats = rl.ResidStats(x.double().sum(0), 80, (0, 1, 2), "resid_post", per_prompt=x)
    harm = np.r_[np.ones(40), np.zeros(40)]
    table = rank_layers_by_score(v, stats, harm, by="auroc")
    assert table.layer.iloc[0] == 2 and table.auroc.iloc[0] == 1.0
    proj = projections(v, stats).numpy()
    assert table.set_index("layer").pearson[1] == pytest.approx(np.corrcoef(proj[:, 1], harm)[0, 1], abs=1e-12)
    graded = rank_layers_by_score(v, stats, proj[:, 1] + 0.01 * np.arange(80))  # a score that tracks layer 1
    assert graded.layer.iloc[0] == 1 and np.isnan(graded.auroc).all()
    with pytest.raises(ShapeError, match="one score per prompt"):
        rank_layers_by_score(v, stats, harm[:5])
    with pytest.raises(ConfigError, match="for 0/1 labels"):
        rank_layers_by_score(v, stats, proj[:, 0], by="auroc")


def test_contrastive_then_rank_on_a_model():
    model = make_native(seed=3)
    pos, neg = _sets()
    a, b = contrastive_stats(model, pos, neg)
    table = rank_layers(a, b, holdout=0.5, seed=1)
    assert sorted(table.layer) == [0, 1, 2] and table.auroc.between(0, 1).all()
