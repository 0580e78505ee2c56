"""run_experiment end to end: a diverging run, fresh-process reproducibility, kill-and-resume, two processes."""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import reversion_lens as rl
from reversion_lens.errors import NonFiniteError
from reversion_lens.io import FORMAT_VERSION, load_tensors, read_json
from reversion_lens.pipeline import ExperimentConfig, SerialExecutor, run_experiment

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "reversion_lens"


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
    with pytest.raises(
        NonFiniteError, match=r"at fine-tuning step 5: non-finite activations at layer 1 \(resid_post\)"
    ):
        run_experiment(SMALL_NAN, out, SerialExecutor(), log=None)
    run = out / "runs" / "seed0" / "none"
    assert sorted(p.name for p in (run / "steps").iterdir()) == [
        "step_0.json", "step_1.json", "step_1.safetensors", "step_2.json", "step_2.safetensors"
    ]  # fmt: skip
    for name in ("done.json", "trajectory.csv", "means.safetensors", "evals.json"):
        assert not (run / name).exists()
    assert not (out / "trajectories.csv").exists() and not (out / "summary.json").exists()
    assert _scan_finite(out) >= 10


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
    from reversion_lens.pipeline import make_setting
    from reversion_lens.toyworld import demo

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
