"""The pretrained toy bases shipped with the package: intact, made by the recipe the code runs, and used."""

import hashlib
import json

import pytest
import torch

from reversion_lens.io import load_tensors
from reversion_lens.toyworld import PRETRAIN_FIELDS, ToyConfig, build_history
from reversion_lens.toyworld.history import BASES, CACHE_VERSION, pretraining_losses

MANIFEST = json.loads((BASES / "MANIFEST.json").read_text())
CONFIG = ToyConfig.preset(MANIFEST["preset"])


def test_every_shipped_base_is_listed_intact_and_keyed_by_its_config():
    assert MANIFEST["cache_version"] == CACHE_VERSION  # a change to the weights' recipe must rebuild them
    listed = {b["folder"] for b in MANIFEST["bases"].values()}
    assert listed == {p.name for p in BASES.iterdir() if p.is_dir()}
    for seed, b in MANIFEST["bases"].items():
        assert b["folder"] == f"pretrain-{CONFIG.key(int(seed), PRETRAIN_FIELDS)}"
        weights = BASES / b["folder"] / "base" / "model.safetensors"
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == b["sha256"]
        load_tensors(weights)  # and its own content hash holds
    assert len(MANIFEST["bases"]) >= 12  # the demo's seeds


@pytest.mark.parametrize("seed", [0, 7])
def test_the_recipe_reproduces_the_recorded_pretraining(seed):
    want = MANIFEST["bases"][str(seed)]["losses"]
    got = pretraining_losses(CONFIG, seed, len(want))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    assert got[-1] < got[0]  # it is training


def test_a_history_starts_from_the_shipped_base_without_pretraining(tmp_path):
    hist = build_history(CONFIG, seed=3, cache_dir=tmp_path)
    assert hist.meta["pretrain_shipped"] is True and hist.meta["pretrain_cached"] is True
    shipped, _ = load_tensors(BASES / MANIFEST["bases"]["3"]["folder"] / "base" / "model.safetensors")
    copied, _ = load_tensors(tmp_path / MANIFEST["bases"]["3"]["folder"] / "base" / "model.safetensors")
    assert shipped.keys() == copied.keys() and all(torch.equal(shipped[k], copied[k]) for k in shipped)
    base = hist.load("base").state_dict()
    assert all(torch.equal(base[k], shipped[k]) for k in shipped if k in base)
