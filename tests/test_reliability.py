"""Reliability: bad input is one clear error, nothing unsafe is loaded, a killed run resumes to the same numbers.

Each test fails if its guarantee breaks. Already covered elsewhere (not repeated here):

* incompatible n_layers / d_vocab in a History: ``test_core::test_history_incompatible_checkpoints``;
  from model specs' config.json: ``test_models::test_mismatched_architectures_are_rejected_from_config_json``;
* unknown site, out-of-range / duplicate layer in ``sites``: ``test_core::test_sites_map_and_errors``;
* zero-norm / NaN direction via ``from_vectors``, d_model mismatch in ``check_model``:
  ``test_core::test_direction_errors_and_roundtrip``;
* NaN activations name the layer (statistics) and the step (tracking): ``test_core::test_nonfinite_activations_raise``,
  ``test_tracking::test_nonfinite_names_step_and_layer``; a NaN loss names the step:
  ``test_training::test_nonfinite_loss_names_the_step``;
* empty probe set, prompt without tokens, left padding without a mask, holes in a mask, vocab check:
  ``test_core::test_probe_validation``;
* truncated statistics file: ``test_core::test_stats_save_load_roundtrip``;
* results folder of another format version / config: ``test_experiments::test_results_folder_guards``;
* unknown top-level TOML field: ``test_experiments::test_config_validation_and_toml``;
* the fine-tuning loop killed and resumed bit for bit, other arguments refused: ``test_training``;
* a finished experiment rerun is not recomputed: ``test_demo::test_rerun_skips_finished_runs_and_is_identical``;
* property tests of the pure statistics (cosine / projection invariances, exact null vs Monte Carlo,
  bootstrap coverage, Spearman): ``test_stats``. Added here: drift metrics and the tensor file round trip.
"""

import argparse
import ast
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_native, random_seqs
from hypothesis import given, settings
from hypothesis import strategies as st

import reversion_lens as rl
from reversion_lens.directions import Direction, mean_difference
from reversion_lens.drift import drift_metrics
from reversion_lens.errors import (
    ConfigError,
    DirectionError,
    IncompatibleCheckpointsError,
    NonFiniteError,
    ProbeError,
    ResultsFormatError,
    ShapeError,
    SiteError,
    UnsafeLoadError,
)
from reversion_lens.pipeline import ExperimentConfig, SerialExecutor, run_experiment
from reversion_lens.pipeline.layout import record_config
from reversion_lens.history import Checkpoint, History
from reversion_lens.interventions import block
from reversion_lens.io import FORMAT_VERSION, load_tensors, read_json, safe_torch_load, save_tensors, write_json
from reversion_lens.models import load_native, save_native
from reversion_lens.pipeline.results import load_trajectories
from reversion_lens.tracking import DriftTracker

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reversion_lens"
L, D, V = 3, 32, 40
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True)


def hook_count(model):
    points = {id(hp): hp for hp in model.hook_dict.values()}.values()
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) + len(hp._forward_hooks) + len(hp._backward_hooks) for hp in points)


@pytest.fixture(scope="module")
def world():
    """A 3-layer model pair, probes, their statistics and v_rev."""
    probes = rl.ProbeSet.from_tokens(random_seqs(6, vocab=V, seed=2))
    base = rl.residual_stats(make_native(seed=1), probes, meta={"checkpoint": "base"})
    aligned = rl.residual_stats(make_native(seed=2), probes, meta={"checkpoint": "aligned"})
    return probes, base, aligned, mean_difference(base, aligned)


# =============================================================================== bad input: one clear error
class _Loads:
    """A checkpoint loader that counts loads (a signature-less checkpoint: only loading reveals its shape)."""

    def __init__(self, **kw):
        self.kw, self.n = kw, 0

    def __call__(self):
        self.n += 1
        return make_native(**self.kw)


@pytest.mark.parametrize(
    "other, fragment",
    [({"n_layers": 2}, "n_layers 3 vs 2"), ({"d_model": 16}, "d_model 32 vs 16"), ({"d_vocab": 41}, "d_vocab 40 vs 41")],
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
    hist = History([Checkpoint.in_memory("base", make_native(seed=1)), Checkpoint.in_memory("aligned", make_native(seed=2))])
    st_ = hist.stats(rl.ProbeSet.from_tokens(random_seqs(3, vocab=V)), meta={"run": "r1"})
    assert [s.meta.get("run") for s in st_.values()] == ["r1", "r1"]  # (the second used to lose it)


def test_unknown_site_or_layer(tiny_model, world):
    probes, base, aligned, v = world
    with pytest.raises(SiteError, match="unknown site 'resid'; choose one of resid_pre"):
        rl.residual_stats(tiny_model, probes, site="resid")
    with pytest.raises(SiteError, match=r"layer 3 is out of range for a model with 3 layers; use 0..2"):
        rl.residual_stats(tiny_model, probes, layers=[0, 3])
    with pytest.raises(SiteError, match="not an integer"):
        rl.residual_stats(tiny_model, probes, layers=[1.0])
    with pytest.raises(DirectionError, match=r"covers layers \(0, 1, 2\), not layer 5"):
        v[5]
    with pytest.raises(DirectionError, match=r"layers \[7\] are not covered"):
        v.select([0, 7])
    with pytest.raises(ConfigError, match="unknown site 'resid'; choose one of"):
        ExperimentConfig(site="resid")
    far = Direction.from_vectors(torch.randn(2, D, generator=torch.Generator().manual_seed(0)), layers=[0, 5])
    with pytest.raises(ShapeError, match="covers layer 5 but the model has only 3 layers"):
        block(tiny_model, far, "grad")
    with pytest.raises(SiteError, match="out of range"):
        DriftTracker(probes, far, base.mean[[0, 1]], aligned.mean[[0, 1]])(0, tiny_model)
    assert hook_count(tiny_model) == 0


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Direction(torch.ones(D), torch.ones(1), (0,)), "non-empty 2-D tensor"),
        (lambda: Direction(torch.ones(2, 3, D), torch.ones(2), (0, 1)), "non-empty 2-D tensor"),
        (lambda: Direction(torch.ones(0, D), torch.ones(0), ()), "non-empty 2-D tensor"),
        (lambda: Direction.from_vectors(torch.ones(2, 3, D)), r"must be \[layer, d_model\]"),
        (lambda: Direction.from_vectors(torch.ones(3, D), layers=[0, 1]), "give one layer per row"),
        (lambda: Direction(torch.ones(2, D), torch.ones(2), (0, 1)), "unit norm; build them with Direction.from_vectors"),
        (lambda: Direction.from_vectors(torch.cat([torch.ones(1, D), torch.zeros(1, D)])), r"zero norm at layer\(s\) \[1\]"),
        (lambda: Direction.from_vectors(torch.full((2, D), float("inf"))), r"non-finite values at layer\(s\) \[0, 1\]"),
        (lambda: Direction.from_vectors(torch.tensor([[1.0, -math.inf]])), "non-finite.*Recompute"),
        (lambda: Direction.from_vectors(torch.eye(2, D), layers=[0, 0]), "distinct non-negative"),
        (lambda: Direction.from_vectors(torch.eye(2, D), layers=[-1, 0]), "use 3, not -1"),
        (lambda: Direction(torch.eye(2, D), torch.tensor([1.0, math.nan]), (0, 1)), "norms .* not finite"),
    ],
)
def test_bad_directions(make, fragment):
    with pytest.raises(DirectionError, match=fragment):
        make()


def test_direction_on_a_model_with_another_d_model(world):
    probes, base, aligned, v = world
    small = make_native(d_model=16)
    with pytest.raises(ShapeError, match="direction has d_model 32 but the model has 16; it was derived for another model"):
        block(small, v, "grad")
    with pytest.raises(ShapeError, match="direction d_model 32.*measure the model the direction was derived for"):
        DriftTracker(probes, v, aligned, base)(3, small)
    with pytest.raises(ShapeError, match="d_model 32 vs 16"):
        mean_difference(base, rl.residual_stats(small, probes))
    assert hook_count(small) == 0


def _nan_from_batch(model, layer, batch):
    """Make ``layer``'s output NaN from the ``batch``-th forward pass on (a run of bad batches)."""
    calls = {"n": 0}

    def hook(x, hook):
        calls["n"] += 1
        return x * float("nan") if calls["n"] > batch else x

    model.blocks[layer].hook_out.add_hook(hook)


def test_nonfinite_statistics_stop_naming_layer_and_batch_and_are_never_held(tmp_path):
    model = make_native()
    _nan_from_batch(model, layer=1, batch=1)
    probes = rl.ProbeSet.from_tokens(random_seqs(6, vocab=V))
    where = r"layer 1 \(resid_post\) in probe batch 1 \(prompts 3..5\).*No statistics were written"
    with pytest.raises(NonFiniteError, match=where):
        rl.residual_stats(model, probes, batch_size=3)
    model.reset_hooks()
    # A ResidStats never holds NaN, so it can neither be saved nor used; a NaN file written by other code
    # cannot be loaded either.
    bad = torch.zeros(L, D, dtype=torch.float64)
    bad[2, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\(sum\) at site resid_post contain NaN or inf at layer\(s\) \[2\]"):
        rl.ResidStats(bad, 4, (0, 1, 2), "resid_post")
    pp = torch.zeros(4, L, D)
    pp[1, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"per-prompt vectors.*layer\(s\) \[0\]"):
        rl.ResidStats(torch.zeros(L, D, dtype=torch.float64), 4, (0, 1, 2), "resid_post", per_prompt=pp)
    meta = {"kind": "resid_stats", "count": 4, "layers": [0, 1, 2], "site": "resid_post"}
    save_tensors(tmp_path / "nan.safetensors", {"sum": bad}, meta)
    with pytest.raises(NonFiniteError, match="layer"):
        rl.ResidStats.load(tmp_path / "nan.safetensors")


SMALL_NAN = ExperimentConfig(
    params={"preset": "tiny", "n_probes": 64}, seeds=(0,), arms=("none",), steps=6, track_steps=(1, 2, 5, 6),
    eval_steps=(0, 6), null_draws=2000, workers=1,
)  # fmt: skip


def _scan_finite(out: Path) -> int:
    """Every JSON and safetensors file under ``out`` parses and holds only finite numbers; returns the count."""
    n = 0
    for path in out.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".json":
            text = path.read_text()
            assert "NaN" not in text and "Infinity" not in text, path
            json.loads(text)
        elif path.suffix == ".safetensors":
            for t in load_tensors(path)[0].values():
                assert not t.is_floating_point() or torch.isfinite(t).all(), path
        n += 1
    return n


def test_run_that_diverges_stops_at_the_step_and_layer_and_writes_no_nan(tmp_path, monkeypatch):
    """Weights go NaN in block 1 before the step-5 measurement of a real experiment run."""
    from reversion_lens import tracking

    real = tracking.residual_stats
    calls = []

    def poisoned(model, probes, **kw):
        calls.append(1)
        if len(calls) == 3:  # tracked steps 1, 2, then 5
            with torch.no_grad():
                for p in model.blocks[1].parameters():
                    p.fill_(float("nan"))
        return real(model, probes, **kw)

    monkeypatch.setattr(tracking, "residual_stats", poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"at fine-tuning step 5: non-finite activations at layer 1 \(resid_post\)"):
        run_experiment(SMALL_NAN, out, SerialExecutor(), log=None)
    run = out / "runs" / "seed0" / "none"
    assert sorted(p.name for p in (run / "steps").iterdir()) == [
        "step_0.json", "step_1.json", "step_1.safetensors", "step_2.json", "step_2.safetensors"
    ]  # fmt: skip
    for name in ("done.json", "trajectory.csv", "means.safetensors", "evals.json"):
        assert not (run / name).exists()
    assert not (out / "trajectories.csv").exists() and not (out / "summary.json").exists()
    assert _scan_finite(out) >= 10


def test_empty_probe_sets():
    for make in (
        lambda: rl.ProbeSet(torch.zeros((0, 4), dtype=torch.long), torch.zeros((0, 4), dtype=torch.long)),
        lambda: rl.ProbeSet(torch.zeros((2, 0), dtype=torch.long), torch.zeros((2, 0), dtype=torch.long)),
        lambda: rl.ProbeSet.from_tokens(torch.zeros((0, 5), dtype=torch.long)),
    ):
        with pytest.raises(ProbeError, match="the probe set is empty; give at least one prompt"):
            make()
    with pytest.raises(ProbeError, match="prompt 1 has no real tokens.*drop it or fix its mask"):
        rl.ProbeSet(torch.ones((2, 3), dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_token_ids_outside_the_vocabulary_fail_before_any_forward_pass(tiny_model, world):
    _, base, aligned, v = world
    ran = []
    tiny_model.blocks[0].hook_in.add_hook(lambda x, hook: ran.append(1))
    probes = rl.ProbeSet.from_tokens([[1, 2, 3], [4, V, 5]])
    with pytest.raises(ProbeError, match=rf"token id {V} \(prompt 1, position 1\) is outside the model's vocabulary of {V}"):
        rl.residual_stats(tiny_model, probes)
    with pytest.raises(ProbeError, match="tokenised for a different model"):
        DriftTracker(probes, v, aligned, base)(1, tiny_model)
    assert ran == []
    tiny_model.reset_hooks()
    with pytest.raises(ProbeError, match="non-negative"):
        rl.ProbeSet.from_tokens(torch.tensor([[1, -2, 3]]))
    # padding is masked but still embedded: a pad id beyond the vocabulary is refused too, with the fix
    padded = rl.ProbeSet.from_tokens([[1, 2, 3], [4]], pad_id=V + 10)
    with pytest.raises(ProbeError, match=rf"pad id {V + 10} \(prompt 1, position 1\).*Pad with an id inside the vocabulary"):
        rl.residual_stats(tiny_model, padded)
    assert ran == []


def test_padding_without_a_mask_is_refused():
    left = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    with pytest.raises(ProbeError, match="look left-padded.*Pass attention_mask"):
        rl.ProbeSet.from_tokens(left, pad_id=0)
    right = torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10]])
    with pytest.raises(ProbeError, match="look right-padded.*pad tokens would be read.*Pass attention_mask"):
        rl.ProbeSet.from_tokens(right, pad_id=0)
    # with the mask both are fine and read the same last tokens
    for toks in (left, right):
        p = rl.ProbeSet.from_tokens(toks, attention_mask=(toks != 0).long())
        assert p.tokens[torch.arange(2), p.last_positions()].tolist() == [6, 10]


# ----------------------------------------------------------------------------- files: corrupted, old, new
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
    with pytest.raises(ResultsFormatError, match=rf"results format {FORMAT_VERSION + 1}, newer.*Upgrade reversion_lens"):
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


def test_config_files_with_unknown_fields_or_bad_values(tmp_path):
    cases = {
        'seeds = [0]\n[toy]\nd_modle = 32\n': r"unknown \[toy\] field\(s\) \['d_modle'\]; valid fields are",
        '[toy]\npreset = "huge"\n': "unknown preset 'huge'; use one of",
        'preset = "tiny"\n': r"unknown config field\(s\) \['preset'\]",
        'steps = "100"\n': "wrong kind.*steps an integer",
        'seeds = 3\n': "'seeds' must be a list.*seeds = \\[0, 1\\]",
        'site = "resid"\n': "unknown site 'resid'",
        'arms = ["grad:vrev"]\n': "unknown arm 'grad:vrev'",
        'seeds = [0\n': "not valid TOML.*fix the syntax",
        'setting = "toys"\n': "unknown setting 'toys'",
        'arms = ["grad:v_rev@2"]\n[toy]\npreset = "tiny"\n': r"blocks layer\(s\) \[2\], but the model has 2 layers \(0..1\)",
    }
    for text, fragment in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            ExperimentConfig.from_toml(path)


# ============================================================================================ safe loading
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


# ============================================================================ properties missing in test_stats
@st.composite
def drift_setups(draw):
    d = draw(st.integers(2, 12))
    n_layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ref, base, cur = (torch.randn(n_layers, d, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    v = Direction.from_vectors(torch.randn(n_layers, d, generator=g, dtype=torch.float64))
    return cur, ref, base, v


def _metrics(cur, ref, base, v):
    rows = drift_metrics(cur, ref, base, v)
    return {k: np.array([r[k] for r in rows]) for k in ("cos", "projection", "drift_norm", "reversion_ratio")}


@PROPERTY
@given(drift_setups(), st.floats(-50, 50), st.floats(1e-2, 1e2))
def test_drift_metrics_translation_scale_and_sign(setup, shift, scale):
    cur, ref, base, v = setup
    m = _metrics(cur, ref, base, v)
    assert (np.abs(m["cos"]) <= 1 + 1e-12).all() and (m["drift_norm"] >= 0).all()
    # the same offset added to every state changes nothing
    t = _metrics(cur + shift, ref + shift, base + shift, v)
    for k in m:
        np.testing.assert_allclose(t[k], m[k], rtol=1e-6, atol=1e-6 * (1 + abs(shift)))
    # scaling all activations scales projection and norm, not cos or the reversion ratio
    s = _metrics(cur * scale, ref * scale, base * scale, v)
    np.testing.assert_allclose(s["cos"], m["cos"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["reversion_ratio"], m["reversion_ratio"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["projection"], scale * m["projection"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["drift_norm"], scale * m["drift_norm"], rtol=1e-9, atol=1e-12)
    # flipping the direction flips the signed metrics only
    f = _metrics(cur, ref, base, Direction.from_vectors(-v.vectors.double()))
    np.testing.assert_allclose(f["cos"], -m["cos"], atol=1e-6)
    np.testing.assert_allclose(f["drift_norm"], m["drift_norm"], atol=1e-12)
    # moving a fraction of the way back to the base along v_rev = mean_difference: cos 1, ratio = fraction
    v_rev = Direction.from_vectors(base - ref)
    frac = 0.37
    back = _metrics(ref + frac * (base - ref), ref, base, v_rev)
    np.testing.assert_allclose(back["cos"], 1.0, atol=1e-6)
    np.testing.assert_allclose(back["reversion_ratio"], frac, atol=1e-6)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]


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


# =============================================================================== faults and reproducibility
CLI = ["demo", "--preset", "tiny", "--seeds", "1", "--steps", "30", "--arms", "none,grad:v_rev", "--figures", "none",
       "--workers", "1"]  # fmt: skip


def _cli(out: Path) -> list[str]:
    return [sys.executable, "-m", "reversion_lens.cli", *CLI, "--out", str(out)]


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(_cli(out), cwd=ROOT, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 240) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-3000:]


def _visible_files(out: Path) -> dict[str, Path]:
    """Files a reader may open: not hidden, not under a hidden folder (temporary files and locks are hidden)."""
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out).parts)}  # fmt: skip


def _assert_all_readable(out: Path) -> None:
    """What a kill can leave behind: every visible file is complete; a checkpoint pointer points at a whole checkpoint."""
    for rel, path in _visible_files(out).items():
        if path.suffix == ".json":
            assert isinstance(read_json(path), dict), rel
        elif path.suffix == ".safetensors":
            load_tensors(path)  # parses and matches its checksum
        elif path.suffix == ".csv":
            text = path.read_text()
            assert text.endswith("\n"), rel
            pd.read_csv(path)
        if path.name == "latest.json":
            step = path.parent / read_json(path)["folder"]
            whole = ["extra.safetensors", "model.safetensors", "optimizer.safetensors", "trainer.json"]
            assert sorted(p.name for p in step.iterdir()) == whole, step


def _assert_same_results(out: Path, ref: Path) -> None:
    """Every result file, byte for byte (config.json records argv, hence the folder, so it differs)."""
    got, want = _visible_files(out), _visible_files(ref)
    got.pop("config.json"), want.pop("config.json")
    assert sorted(got) == sorted(want)
    different = [rel for rel in want if got[rel].read_bytes() != want[rel].read_bytes()]
    assert not different, different


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the tiny configuration, in a fresh process."""
    from reversion_lens.toyworld import demo
    from reversion_lens.pipeline import make_setting

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    # the cached tiny history of seed 0 (trained here, once, on a machine whose cache lacks it)
    make_setting(demo.config_from_args(parser.parse_args(CLI[1:]))).history(0)
    out = tmp_path_factory.mktemp("reference") / "out"
    _finish(_start(out))
    return out


@pytest.mark.slow
def test_same_config_same_bytes_in_a_fresh_process_and_the_folder_records_itself(reference, tmp_path):
    ref = reference
    _finish(_start(tmp_path / "out"))
    assert (tmp_path / "out" / "trajectories.csv").read_bytes() == (ref / "trajectories.csv").read_bytes()
    _assert_same_results(tmp_path / "out", ref)
    rec = read_json(ref / "config.json")
    cfg = ExperimentConfig.from_dict(rec["config"])
    assert rec["format_version"] == FORMAT_VERSION and rec["config_hash"] == cfg.hash()
    assert (cfg.params["preset"], cfg.seeds, cfg.steps, cfg.arms) == ("tiny", (0,), 30, ("none", "grad:v_rev"))
    env = rec["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["reversion_lens"] == rl.__version__
    assert all(env["versions"][k] for k in ("transformer-lens", "numpy", "pandas", "safetensors"))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: its commit, and whether the package differs from it
        assert env["git_commit"] == head.stdout.strip() and isinstance(env["git_dirty"], bool)
    assert rec["argv"][1:] == [*CLI, "--out", str(ref)]
    summary = read_json(ref / "summary.json")
    assert summary["config"] == json.loads(json.dumps(cfg.result_fields())) and "workers" not in summary["config"]


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


def _kill_points(ref: Path, rng: random.Random, n: int) -> list[str]:
    """``n`` seeded random moments of a run, in order: files of the uninterrupted run (in the order it wrote
    them), one drawn from each of ``n`` consecutive slices, so the kills spread over every phase."""
    order = sorted(_visible_files(ref).items(), key=lambda kv: (kv[1].stat().st_mtime_ns, kv[0]))
    names = [rel for rel, _ in order if rel not in ("config.json", "summary.md")]
    size = len(names) / n
    return [rng.choice(names[round(k * size) : round((k + 1) * size)]) for k in range(n)]


@pytest.mark.slow
def test_killed_three_times_then_resumed_equals_the_uninterrupted_run(reference, tmp_path):
    """SIGKILL at three seeded random moments (a file the run writes, then a random delay), then a rerun."""
    ref = reference
    out = tmp_path / "out"
    rng = random.Random(20260501)
    finished: dict[Path, int] = {}  # done.json / seed.json -> mtime when first seen
    kills = []
    for trigger in _kill_points(ref, rng, 3):
        proc = _start(out)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not (out / trigger).exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills.append((trigger, proc.returncode))
        _assert_all_readable(out)  # whatever the moment, no visible file is partial
        for p in [*out.rglob("done.json"), *out.rglob("seed.json")]:
            finished.setdefault(p, p.stat().st_mtime_ns)
    assert [rc for _, rc in kills].count(-signal.SIGKILL) >= 2, kills  # the kills landed mid-run
    _finish(_start(out))
    assert finished and all(p.stat().st_mtime_ns == m for p, m in finished.items())  # finished work was not redone
    assert (out / "trajectories.csv").read_bytes() == (ref / "trajectories.csv").read_bytes()
    assert (out / "summary.json").read_bytes() == (ref / "summary.json").read_bytes()
    _assert_same_results(out, ref)


@pytest.mark.slow
def test_two_processes_on_one_folder_at_once(reference, tmp_path):
    ref = reference
    out = tmp_path / "out"
    procs = [_start(out), _start(out)]
    for p in procs:
        _finish(p)
    _assert_all_readable(out)
    _assert_same_results(out, ref)
    done = sorted(p.parent.name for p in out.rglob("done.json"))
    assert done == ["grad:v_rev", "none"]
