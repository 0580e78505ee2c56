"""History and Checkpoint: native checkpoints, the same-architecture check, meta reaching every checkpoint."""

import json

import pytest
import torch
from conftest import make_native, random_seqs

import reversion_lens as rl
from reversion_lens.directions import mean_difference
from reversion_lens.errors import IncompatibleCheckpointsError
from reversion_lens.history import Checkpoint, History
from reversion_lens.models import save_native

V = 40


def test_history_native_checkpoints(tmp_path):
    save_native(make_native(seed=1), tmp_path / "base")
    save_native(make_native(seed=2), tmp_path / "aligned")
    hist = History([Checkpoint.native("base", tmp_path / "base"), Checkpoint.native("aligned", tmp_path / "aligned")])
    probes = rl.ProbeSet.from_tokens(random_seqs(6))
    v = hist.direction(probes)
    expect = mean_difference(
        rl.residual_stats(make_native(seed=1), probes), rl.residual_stats(make_native(seed=2), probes)
    )
    torch.testing.assert_close(v.vectors, expect.vectors, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "base" / "config.json").read_text())["d_model"] == 32


def test_history_incompatible_checkpoints(tmp_path):
    save_native(make_native(seed=1), tmp_path / "base")
    save_native(make_native(n_layers=2, seed=2), tmp_path / "aligned")
    with pytest.raises(IncompatibleCheckpointsError, match="'base' and 'aligned'.*n_layers 3 vs 2"):
        History([Checkpoint.native("base", tmp_path / "base"), Checkpoint.native("aligned", tmp_path / "aligned")])
    other_vocab = Checkpoint.in_memory("aligned", make_native(d_vocab=41))
    with pytest.raises(IncompatibleCheckpointsError, match="d_vocab 40 vs 41"):
        History([Checkpoint.in_memory("base", make_native()), other_vocab])


class _Loads:
    """A checkpoint loader that counts loads (a signature-less checkpoint: only loading reveals its shape)."""

    def __init__(self, **kw):
        self.kw, self.n = kw, 0

    def __call__(self):
        self.n += 1
        return make_native(**self.kw)


@pytest.mark.parametrize(
    "other, fragment",
    [
        ({"n_layers": 2}, "n_layers 3 vs 2"),
        ({"d_model": 16}, "d_model 32 vs 16"),
        ({"d_vocab": 41}, "d_vocab 40 vs 41"),
    ],
)
def test_history_checkpoints_of_another_shape_are_refused(other, fragment):
    # With signatures known up front (config.json / in memory): refused when the history is built.
    with pytest.raises(IncompatibleCheckpointsError, match=rf"'base' and 'aligned' .*{fragment}.*same architecture"):
        History([Checkpoint.in_memory("base", make_native()), Checkpoint.in_memory("aligned", make_native(**other))])
    # Without (a bare loader): refused as soon as the second one is loaded, and nothing is returned.
    loads = _Loads(**other)
    hist = History([Checkpoint("base", _Loads()), Checkpoint("aligned", loads)])
    with pytest.raises(IncompatibleCheckpointsError, match=fragment):
        hist.stats(rl.ProbeSet.from_tokens(random_seqs(3, vocab=V)))
    assert loads.n == 1


def test_history_meta_reaches_every_checkpoint():
    hist = History(
        [Checkpoint.in_memory("base", make_native(seed=1)), Checkpoint.in_memory("aligned", make_native(seed=2))]
    )
    st_ = hist.stats(rl.ProbeSet.from_tokens(random_seqs(3, vocab=V)), meta={"run": "r1"})
    assert [s.meta.get("run") for s in st_.values()] == ["r1", "r1"]  # (the second used to lose it)
