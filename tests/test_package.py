"""The package namespace: public verbs load lazily, unknown names fail with a clear AttributeError."""

import pytest

import reversion_lens as rl


def test_public_verbs_load_lazily():
    from reversion_lens import interventions, tracking, training

    assert rl.block is interventions.block and rl.finetune is training.finetune
    assert rl.DriftTracker is tracking.DriftTracker
    with pytest.raises(AttributeError, match="no attribute 'blockk'"):
        _ = rl.blockk
