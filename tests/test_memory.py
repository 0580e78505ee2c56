"""Memory: tensor files are written and read without a copy of the whole file, the matched null's draws
reuse their buffers, and freed models are handed back (benchmarks/bench_memory.py measures the peaks)."""

import json
import math
import tracemalloc

import pytest
import safetensors.torch
import torch

from reversion_lens import io as rio
from reversion_lens import stats


def _old_bytes(tensors, meta):
    """The bytes save_tensors wrote before streaming: safetensors' own serialisation, metadata re-sorted."""
    raw = safetensors.torch.save(tensors, metadata=meta)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + raw[8 + n :]


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.int8, torch.bool]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_streamed_files_are_byte_identical_to_safetensors_layout(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(int(torch.randint(0, 7, (1,), generator=g))):
        shape = torch.randint(0, 4, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g).tolist()
        dtype = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=g))]
        tensors[f"{'zab'[i % 3]}.{i}"] = (torch.randn(shape, generator=g) * 50).to(dtype)
    path = rio.save_tensors(tmp_path / "x.safetensors", tensors, {"kind": "x", "layers": [0, 2]})
    meta = {"format_version": str(rio.FORMAT_VERSION), "kind": "x", "layers": "[0, 2]"}
    meta["sha256"] = rio._content_hash(tensors, meta)
    assert path.read_bytes() == _old_bytes(tensors, meta)
    back, got = rio.load_tensors(path)
    assert back.keys() == tensors.keys() and got["layers"] == [0, 2]
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())


def test_files_of_other_writers_load_and_bad_layouts_are_refused(tmp_path):
    t = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64), "e": torch.zeros(0)}
    safetensors.torch.save_file(t, tmp_path / "hf.safetensors")  # no metadata, no checksum: as Hugging Face writes
    back, meta = rio.load_tensors(tmp_path / "hf.safetensors")
    assert meta == {} and all(torch.equal(back[k], v) for k, v in t.items())
    raw = (tmp_path / "hf.safetensors").read_bytes()
    (tmp_path / "long.safetensors").write_bytes(raw + b"\0" * 8)  # bytes no tensor owns
    with pytest.raises(rio.ResultsFormatError, match="corrupted or truncated"):
        rio.load_tensors(tmp_path / "long.safetensors")
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["a"]["data_offsets"] = [header["a"]["data_offsets"][0] + 8, header["a"]["data_offsets"][1] + 8]
    head = json.dumps(header).encode()
    (tmp_path / "gap.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + raw[8 + n :] + b"\0" * 8)
    with pytest.raises(rio.ResultsFormatError, match="do not tile the data"):
        rio.load_tensors(tmp_path / "gap.safetensors")


def test_save_and_load_hold_no_copy_of_the_file(tmp_path):
    """The old save built the file as Python bytes (twice its tensors), the old load read it whole: both
    are Python allocations, which tracemalloc sees. Now neither holds more than the header."""
    tensors = {"w": torch.randn(2_000_000), "m": torch.randn(1000, 2000)}  # 16 MB
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    tracemalloc.start()
    try:
        rio.save_tensors(tmp_path / "big.safetensors", tensors, {"kind": "x"})
        saved = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        back, _ = rio.load_tensors(tmp_path / "big.safetensors")
        loaded = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert saved < size / 16 and loaded < size / 16, (saved, loaded, size)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def _old_matched(cov, v, n, seed, chunk_elements):
    """matched_null_samples before its buffers were reused: a fresh pair of tensors per chunk."""
    cov64 = cov.double()
    v_unit = stats._unit64(v, "v")
    evals, evecs = torch.linalg.eigh((cov64 + cov64.transpose(-1, -2)) / 2)
    top = evals.amax(dim=-1, keepdim=True)
    evals = torch.where(evals > top * evals.shape[-1] * torch.finfo(torch.float64).eps, evals, 0.0)
    batch = torch.broadcast_shapes(evals.shape[:-1], v_unit.shape[:-1])
    sd = evals.sqrt().expand(*batch, -1)
    w = sd * (evecs.transpose(-1, -2) @ v_unit.unsqueeze(-1)).squeeze(-1)
    d, gen, out = sd.shape[-1], stats._generator(seed), []
    chunk = max(1, chunk_elements // (d * max(1, math.prod(batch))))
    for start in range(0, n, chunk):
        g = torch.randn(*batch, min(chunk, n - start), d, generator=gen, dtype=torch.float64)
        znorm = (g * sd.unsqueeze(-2)).norm(dim=-1)
        out.append(((g @ w.unsqueeze(-1)).squeeze(-1) / znorm.clamp_min(stats.MIN_NORM)).clamp(-1.0, 1.0))
    return torch.cat(out, dim=-1) if out else sd.new_zeros((*batch, 0))


@pytest.mark.parametrize("cov_shape, v_shape, n", [((3, 7, 7), (3, 7), 1000), ((7, 7), (7,), 333),
                                                   ((2, 1, 6, 6), (4, 6), 257), ((5, 5), (5,), 0)])  # fmt: skip
def test_matched_draws_with_reused_buffers_are_the_same_draws(monkeypatch, cov_shape, v_shape, n):
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 500)  # many chunks, the last one partial
    g = torch.Generator().manual_seed(1)
    a = torch.randn(*cov_shape[:-1], cov_shape[-1] + 2, generator=g, dtype=torch.float64)
    cov, v = a @ a.transpose(-1, -2), torch.randn(v_shape, generator=g)
    for seed in (0, 3):
        got = stats.matched_null_samples(cov, v, n, seed)
        assert torch.equal(got, _old_matched(cov, v, n, seed, 500))


def test_history_hands_each_model_back_before_loading_the_next(monkeypatch):
    from conftest import make_native, random_seqs

    import reversion_lens as rl
    from reversion_lens import history

    events = []
    monkeypatch.setattr(history, "release_memory", lambda: events.append("release"))
    ckpts = [history.Checkpoint(n, lambda s=s, n=n: events.append(f"load {n}") or make_native(seed=s))
             for n, s in (("base", 1), ("aligned", 2))]  # fmt: skip
    hist = history.History(ckpts)
    hist.stats(rl.ProbeSet.from_tokens(random_seqs(3)))
    assert events == ["load base", "release", "load aligned", "release"]
