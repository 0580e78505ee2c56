"""Helpers shared by the block-mode tests (tests/test_modes_*.py): writer components, token data, HF bridges."""

import pytest
import torch
from hf_fixtures import perturbed_copy, save_tiny

from reversion_lens.directions import Direction, as_subspace
from reversion_lens.training import Batch

HF_ARCHS = {"gpt2": ("gpt2", {}), "neox": ("neox", {}), "llama": ("llama", {}), "llama_untied": ("llama", {"tied": False})}


def components(p: torch.Tensor, u: torch.Tensor, axis: int) -> torch.Tensor:
    """``u^T W`` along the ``d_model`` axis (0 for Linear weights and biases, 1 for embeddings and Conv1D)."""
    u = u.to(p)
    return torch.tensordot(u, p, dims=([0], [0])) if axis == 0 else p @ u


def rand_direction(n_layers: int, d: int, seed: int = 1, layers=None) -> Direction:
    layers = tuple(range(n_layers)) if layers is None else tuple(layers)
    g = torch.Generator().manual_seed(seed)
    return Direction.from_vectors(torch.randn(len(layers), d, generator=g), layers)


def sub(v: Direction, layers=None):
    """``v`` (selected) as a k = 1 subspace, so one check covers directions and subspaces."""
    return as_subspace(v if layers is None else v.select(list(layers)))


class Tokens:
    """Random token batches, a deterministic function of the step (every position a target)."""

    def __init__(self, vocab: int, batch: int = 4, pos: int = 10, lo: int = 4):
        self.vocab, self.shape, self.lo = vocab, (batch, pos), lo

    def batch(self, step: int) -> Batch:
        t = torch.randint(self.lo, self.vocab, self.shape, generator=torch.Generator().manual_seed(step))
        return Batch(t, torch.ones_like(t), torch.ones_like(t))


@pytest.fixture(scope="session")
def hf_dirs_modes(tmp_path_factory):
    """Random gpt2 / neox / llama (tied) / llama (untied) folders, perturbed so that no weight sits at its init."""
    root = tmp_path_factory.mktemp("modes_hf")
    return {k: perturbed_copy(save_tiny(arch, root / f"{k}0", **kw), root / k, scale=0.3)
            for k, (arch, kw) in HF_ARCHS.items()}  # fmt: skip


@pytest.fixture
def hf_model(hf_dirs_modes):
    """``hf_model(arch)``: a fresh bridge of that folder (eval mode: no dropout)."""
    from transformer_lens import TransformerBridge

    return lambda arch: TransformerBridge.boot_transformers(str(hf_dirs_modes[arch]), device="cpu")
