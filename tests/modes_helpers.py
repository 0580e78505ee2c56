"""Helpers shared by the block-mode tests (tests/test_modes_*.py): writer components, token data, HF bridges."""

import pytest
import torch
from hf_fixtures import perturbed_copy, save_tiny

from reversion_lens.directions import Direction, as_subspace
from reversion_lens.interventions import block
from reversion_lens.interventions.update import writer_layer
from reversion_lens.orthogonalize import residual_writers
from reversion_lens.training import Batch

HF_ARCHS = {
    "gpt2": ("gpt2", {}),
    "neox": ("neox", {}),
    "llama": ("llama", {}),
    "llama_untied": ("llama", {"tied": False}),
}


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


@torch.no_grad()
def _writes(model, toks):
    """Per token: resid_pre of layer 0, every attn_out / mlp_out, their writers' inputs, every resid_post."""
    L = int(model.cfg.n_layers)
    names = ["blocks.0.hook_resid_pre"]
    for j in range(L):
        names += [f"blocks.{j}.hook_attn_out", f"blocks.{j}.hook_mlp_out", f"blocks.{j}.attn.o.hook_in",
                  f"blocks.{j}.mlp.out.hook_in", f"blocks.{j}.hook_resid_post"]  # fmt: skip
    got = {}

    def keep(x, hook, name):
        got[name] = (x.flatten(2) if x.ndim > 3 else x).double()

    with model.hooks(fwd_hooks=[(n, lambda x, hook, n=n: keep(x, hook, n)) for n in names]):
        model(toks)
    return got


def writer_motion(aligned, tuned, toks, v: Direction):
    """Per blocked layer ``l``: ``max |v_l . (writer part of h_l(t) - h_l(0))|`` over tokens, where the writer part is
    ``(E_t - E_0)(x) + sum_{j<=l} [(W_j(t) - W_j(0)) a_j(x; t) + (b_j(t) - b_j(0))]``, and the max of the whole motion.

    The reader part ``sum_j W_j(0) (a_j(x; t) - a_j(x; 0))`` is the rest; the two add up to the motion exactly."""
    from reversion_lens.orthogonalize import residual_writers

    a, t = _writes(aligned, toks), _writes(tuned, toks)
    writers = {w.label: w for w in residual_writers(aligned)}

    def aligned_write(part, j, x):
        w = writers[f"blocks.{j}.{part}.weight"]
        W = w.parameter.detach().double()
        out = x @ W.T if w.axis == 0 else x @ W
        b = writers.get(f"blocks.{j}.{part}.bias")
        return out + (b.parameter.detach().double() if b is not None else 0)

    out = {}
    for layer in v.layers:
        u = v[layer].double()
        write = t["blocks.0.hook_resid_pre"] - a["blocks.0.hook_resid_pre"]
        for j in range(layer + 1):
            for part, site in (("attn.o", "attn_out"), ("mlp.out", "mlp_out")):
                write = write + t[f"blocks.{j}.hook_{site}"] - aligned_write(part, j, t[f"blocks.{j}.{part}.hook_in"])
        motion = t[f"blocks.{layer}.hook_resid_post"] - a[f"blocks.{layer}.hook_resid_post"]
        out[layer] = ((write @ u).abs().max().item(), (motion @ u).abs().max().item())
    return out


def worst_gradient(model, sub, blocked, shared=False, skip=()) -> dict[str, float]:
    """``max |u^T dL/dW|`` per writer label over the rows ``u`` of every blocked layer the writer must avoid."""
    out = {}
    for w in residual_writers(model):
        if w.label.split(".")[0] in skip:
            continue
        j = writer_layer(w.label)
        rows = [sub[l] for l in blocked if shared or l >= j]
        if not rows or w.parameter.grad is None:
            continue
        out[w.label] = max(components(w.parameter.grad, u, w.axis).abs().max().item() for r in rows for u in r)
    return out


def loss_backward(model, mode, direction, layers=None, seed=0):
    toks = torch.randint(4, int(model.cfg.d_vocab), (3, 9), generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    with block(model, direction, mode, layers=layers):
        model(toks, return_type="loss").backward()
