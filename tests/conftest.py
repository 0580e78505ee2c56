"""Shared fixtures: tiny seeded models, no network anywhere."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One toy-history cache for the whole test session (and across xdist workers: builds are locked per key),
# so the integration, resume and notebook tests train each (config, seed) once.
os.environ.setdefault(
    "REVERSION_LENS_CACHE", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "tests")
)

import pytest
import torch

torch.set_num_threads(1)


def make_native(n_layers: int = 3, d_model: int = 32, d_vocab: int = 40, seed: int = 0, **kw):
    """A tiny seeded TransformerBridge (no Hugging Face model, no hub)."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg = TransformerBridgeConfig(
        d_model=d_model, d_head=8, n_layers=n_layers, n_ctx=32, d_vocab=d_vocab, act_fn="gelu", seed=seed, **kw
    )
    return TransformerBridge.boot_native(cfg)


@pytest.fixture
def tiny_model():
    return make_native()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def random_seqs(n: int, vocab: int = 40, lo: int = 3, hi: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g)
    return [torch.randint(1, vocab, (int(k),), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def world():
    """A 3-layer model pair, probes, their statistics and v_rev (test_tracking.py defines its own)."""
    import reversion_lens as rl
    from reversion_lens.directions import mean_difference

    probes = rl.ProbeSet.from_tokens(random_seqs(6, vocab=40, seed=2))
    base = rl.residual_stats(make_native(seed=1), probes, meta={"checkpoint": "base"})
    aligned = rl.residual_stats(make_native(seed=2), probes, meta={"checkpoint": "aligned"})
    return probes, base, aligned, mean_difference(base, aligned)


# Session fixtures defined beside their helpers, registered for every test module here.
from hf_fixtures import tiny_dirs  # noqa: E402, F401
from modes_helpers import hf_dirs_modes, hf_model  # noqa: E402, F401
