"""The analysis scripts run end to end on the tiny preset (their numbers are in the README and notes)."""

import importlib.util
from pathlib import Path

import pandas as pd

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
