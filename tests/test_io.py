"""reversion_lens.io and the files it guards: checksums, format versions, safe loading, exact round trips, atomic writes."""

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_native
from hypothesis import given, settings
from hypothesis import strategies as st

import reversion_lens as rl
from reversion_lens.directions import Direction
from reversion_lens.errors import DirectionError, ResultsFormatError, UnsafeLoadError
from reversion_lens.io import FORMAT_VERSION, load_tensors, safe_torch_load, save_tensors, write_json
from reversion_lens.models import load_native, save_native
from reversion_lens.pipeline import ExperimentConfig
from reversion_lens.pipeline.layout import record_config
from reversion_lens.pipeline.results import load_trajectories

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reversion_lens"
D = 32
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def test_corrupted_or_truncated_tensor_files_are_refused(tmp_path):
    v = rl.random_direction(D, [0, 2], seed=3)
    path = v.save(tmp_path / "d.safetensors")
    raw = path.read_bytes()
    n_header = int.from_bytes(raw[:8], "little")
    key_at = raw.index(b'"sha256"') + 1
    bad = tmp_path / "bad.safetensors"
    silent = []
    for cut in range(len(raw)):  # every truncation
        bad.write_bytes(raw[:cut])
        with pytest.raises(ResultsFormatError, match="corrupted or truncated: delete it and rerun"):
            Direction.load(bad)
    for i in range(len(raw)):  # every single-bit flip, header and data
        flipped = bytearray(raw)
        flipped[i] ^= 0x10
        bad.write_bytes(bytes(flipped))
        try:
            got = Direction.load(bad)
        except (ResultsFormatError, DirectionError):
            continue
        silent.append((i, torch.equal(got.vectors, v.vectors)))
    # Only a letter of the checksum's own key name can flip unnoticed (the check is then skipped), and the
    # tensors read are still the right ones.
    assert all(key_at <= i < key_at + 6 and same for i, same in silent), silent
    assert 8 + n_header < len(raw)  # the data region was flipped too
    # a model checkpoint with flipped weights is refused, not loaded with wrong weights
    folder = save_native(make_native(), tmp_path / "model")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ResultsFormatError, match="model.safetensors.*do not match the sha256"):
        load_native(folder)


def test_files_from_a_newer_or_unknown_format(tmp_path):
    save_tensors(tmp_path / "new.safetensors", {"v_rev": torch.eye(2, 4)}, {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(
        ResultsFormatError, match=rf"results format {FORMAT_VERSION + 1}, newer.*Upgrade reversion_lens"
    ):
        load_tensors(tmp_path / "new.safetensors")
    save_tensors(tmp_path / "x.safetensors", {"v_rev": torch.eye(2, 4)}, {"kind": "drift_means"})
    with pytest.raises(ResultsFormatError, match="does not hold a direction"):
        Direction.load(tmp_path / "x.safetensors")
    # results folders: runs without a config record, a config record that is not one, a truncated one
    cfg = ExperimentConfig(params={"preset": "tiny"}, seeds=(0,))
    orphan = tmp_path / "orphan"
    (orphan / "runs" / "seed0").mkdir(parents=True)
    with pytest.raises(ResultsFormatError, match="holds runs/ but no config.json.*new --out folder"):
        record_config(orphan, cfg)
    odd = tmp_path / "odd"
    write_json(odd / "config.json", [1, 2])
    with pytest.raises(ResultsFormatError, match="not a reversion_lens config record"):
        record_config(odd, cfg)
    cut = tmp_path / "cut"
    record_config(cut, cfg)
    text = (cut / "config.json").read_text()
    (cut / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ResultsFormatError, match="not valid JSON.*corrupted or truncated"):
        record_config(cut, cfg)
    with pytest.raises(ResultsFormatError, match="does not exist; run the experiment"):
        load_trajectories(tmp_path / "nothing")


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on the marker: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weights": torch.ones(3), "x": _RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    # the payload is live: an unrestricted unpickle runs it (shown with a second marker)
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()
    refused = r"Refusing to load .*evil\.pt.*could run arbitrary code.*convert it to safetensors"
    with pytest.raises(UnsafeLoadError, match=refused):
        safe_torch_load(path)
    assert not marker.exists()
    # the safetensors loader never unpickles: the same bytes are a corrupt file, not code
    path.rename(tmp_path / "evil.safetensors")
    with pytest.raises(ResultsFormatError, match="corrupted or truncated"):
        load_tensors(tmp_path / "evil.safetensors")
    assert not marker.exists()
    # tensors-only files still load
    torch.save({"w": torch.arange(3)}, tmp_path / "ok.pt")
    assert torch.equal(safe_torch_load(tmp_path / "ok.pt")["w"], torch.arange(3))
    (tmp_path / "half.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:100])
    with pytest.raises(ResultsFormatError, match="not a readable torch file.*corrupted or truncated"):
        safe_torch_load(tmp_path / "half.pt")


UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"), ("dill", "load"),
    ("dill", "loads"), ("joblib", "load"), ("marshal", "loads"), ("pd", "read_pickle"), ("pandas", "read_pickle"),
    ("shelve", "open"),
}  # fmt: skip


def _unsafe_calls(source: str) -> list[str]:
    """``pickle.load``-like calls, ``torch.load`` without ``weights_only=True``, ``np.load(allow_pickle=True)``,
    and ``from pickle import load``, found in the syntax tree (comments and strings do not count)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cPickle", "dill", "marshal"):
            names = [a.name for a in node.names if "load" in a.name.lower() or a.name == "Unpickler"]
            found += [f"{node.lineno}: from {node.module} import {name}" for name in names]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
        kw = {k.arg: k.value for k in node.keywords}
        if (name, node.func.attr) in UNSAFE_CALLS:
            found.append(f"{node.lineno}: {name}.{node.func.attr}(...)")
        if (name, node.func.attr) in (("torch", "load"), ("serialization", "load")):
            safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not safe:
                found.append(f"{node.lineno}: torch.load(...) without weights_only=True")
        if (name, node.func.attr) in (("np", "load"), ("numpy", "load")):
            if not (isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False):
                found.append(f"{node.lineno}: np.load(...) without allow_pickle=False")
    return found


def test_the_package_has_no_unsafe_loads():
    assert _unsafe_calls("import pickle\npickle.load(f)\n")  # the scanner finds what it looks for
    assert _unsafe_calls("import torch\ntorch.load(p, map_location='cpu')\n")
    assert _unsafe_calls("torch.load(p, weights_only=False)\n") and _unsafe_calls("from pickle import loads\n")
    assert not _unsafe_calls("torch.load(p, map_location='cpu', weights_only=True)\n# pickle.load(f)\n")
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "analyses").rglob("*.py"))
    assert len(files) > 20
    problems = [f"{f.relative_to(ROOT)}:{hit}" for f in files for hit in _unsafe_calls(f.read_text())]
    assert not problems, "unsafe loads (use safetensors or reversion_lens.io.safe_torch_load):\n" + "\n".join(problems)


DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_tensor_files_round_trip_exactly(tmp_path_factory, specs, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        x = torch.randn(shape, generator=g) * 100
        if dtype == torch.uint8:
            x = x.abs().clamp(max=255)
        tensors[f"t{i}"] = x.to(dtype)
    path = tmp_path_factory.mktemp("rt") / "x.safetensors"
    save_tensors(path, tensors, {"layers": [0, 2], "note": "ok"})
    back, meta = load_tensors(path)
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())
    assert meta["layers"] == [0, 2] and meta["note"] == "ok" and meta["format_version"] == FORMAT_VERSION
    first = path.read_bytes()
    save_tensors(path, tensors, {"layers": [0, 2], "note": "ok"})
    assert path.read_bytes() == first  # same content, same bytes


CRASH = """
import os, sys, torch
from reversion_lens import io
folder = sys.argv[1]
io.save_tensors(folder + "/t.safetensors", {"x": torch.full((1000,), 1.0)}, {"version": 1})
real_fdopen = os.fdopen

class HalfThenDie:  # the process dies (no cleanup, like SIGKILL) halfway through writing the new version
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        os._exit(137)

io.os.fdopen = lambda fd, mode: HalfThenDie(real_fdopen(fd, mode))
io.save_tensors(folder + "/t.safetensors", {"x": torch.full((1000,), 2.0)}, {"version": 2})
"""


def test_a_process_dying_halfway_through_a_write_leaves_the_old_file_whole(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path)], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    tensors, meta = load_tensors(tmp_path / "t.safetensors")
    assert meta["version"] == 1 and torch.equal(tensors["x"], torch.full((1000,), 1.0))
    (partial,) = [p for p in tmp_path.iterdir() if p.name != "t.safetensors"]
    assert partial.name.startswith(".t.safetensors.") and partial.name.endswith(".tmp")  # hidden: never read
    assert 0 < partial.stat().st_size < (tmp_path / "t.safetensors").stat().st_size
