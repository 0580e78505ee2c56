"""The analysis scripts run end to end on the tiny preset (their numbers are in the README and notes)."""

import importlib.util
import os
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"analyses_{name}", ROOT / "analyses" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unlearning_script_measures_and_resumes(tmp_path):
    unlearning = load_script("unlearning")
    out = tmp_path / "unl"
    argv = ["--quick", "--seeds", "1", "--lrs", "3e-4", "--steps", "20", "--workers", "1", "--out", str(out)]
    assert unlearning.main(argv) == 0
    rows = pd.read_csv(out / "lr0.0003" / "trajectories.csv")  # the runner's results folder, as every setting's
    assert set(rows.arm) == {"none", "control:rehearsal"} and sorted(set(rows.step)) == [0, 1, 5, 20]
    assert rows[rows.step == 0].cos.isna().all() and rows[rows.step > 0].cos.between(-1, 1).all()
    start = rows[rows.step == 0]
    assert (start.harmful_rate < 0.05).all() and (start.task_accuracy > 0.9).all()  # unlearned, rest kept
    assert "| other operations | 0.0003 |" in (out / "summary.md").read_text()
    runs = sorted((out / "lr0.0003" / "runs").rglob("done.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert len(runs) == 2 and unlearning.main(argv) == 0  # a rerun keeps finished runs
    assert [p.stat().st_mtime_ns for p in runs] == stamps


@pytest.mark.slow
def test_variance_sources_script_measures_and_resumes(tmp_path):
    # a subprocess: the script's worker processes (spawned with the AVX2 environment) import it as __main__
    import json
    import subprocess
    import sys

    out, cache = tmp_path / "var", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "analyses" / "variance_sources.py"), "--quick", "--sources", "finetune,isa-ft",
           "--workers", "1", "--out", str(out), "--cache-dir", str(cache)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=1200)
    rec = pd.read_csv(out / "records.csv")
    assert len(rec) == 2 * 3 + 2 * 2 - 2 + 2 * 2  # seed (3 arms) + finetune (f=1; f=0 is seed 0's) + isa-ft
    assert set(rec.capability) == {"AVX2", rec[rec.path_ft == "default"].capability.iloc[0]}
    assert rec[rec.arm == "control"].harmful_rate.max() < 0.05 and (rec.first_token_rate == rec.harmful_rate).all()
    iso = rec[rec.path_ft == "avx2"].merge(rec[(rec.path_ft == "default") & (rec.arm != "control")
                                               & (rec.ft == rec.seed)], on=["seed", "arm"])  # fmt: skip
    assert len(iso) == 4 and (iso.digest_x != iso.digest_y).all()  # another float path: other bits
    assert (iso.aligned_digest_x == iso.aligned_digest_y).all()  # same history, fine-tuned on another path
    summary = json.loads((out / "summary.json").read_text())
    assert [r["source"] for r in summary["sources"]] == ["seed", "finetune", "isa-ft"]
    assert summary["chaos"]["isa-ft"]["pairs"] == 4 and "| isa-ft | 2 |" in (out / "summary.md").read_text()
    runs = sorted((out / "runs").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=1200)  # a rerun keeps finished runs
    assert [p.stat().st_mtime_ns for p in runs] == stamps
