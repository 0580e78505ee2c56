"""End to end on the toy world: the phenomenon is measured, not asserted into existence.

Margins come from a measured run of this configuration on seeds 0-5 (tiny preset, T = 100, 64 probes;
see the issue note): harmfulness after fine-tuning minus after alignment, per seed, 0.22 to 0.80;
mean alignment at the last layer in the ``none`` arm over steps 1-100, per seed, 0.57 to 0.78 against an
isotropic p99 of 0.33; ``grad:v_rev`` alignment per seed -0.42 to -0.11; paired harmfulness difference
block - none -0.16 ± 0.06 (per seed -0.24 to -0.10)."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from reversion_lens.io import read_json
from reversion_lens.pipeline import ExperimentConfig, SerialExecutor, run_experiment

ROOT = Path(__file__).resolve().parents[1]
SMALL = ExperimentConfig(
    params={"preset": "tiny", "n_probes": 64}, seeds=(0, 1), arms=("none", "grad:v_rev"), steps=100,
    track_steps=(1, 5, 20, 100), eval_steps=(0, 100),
)  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_experiment(SMALL, out, SerialExecutor(), log=None)
    return out


@pytest.mark.slow
def test_reversion_happens_and_the_block_reduces_it(small_run):
    traj = pd.read_csv(small_run / "trajectories.csv")
    summary = read_json(small_run / "summary.json")
    last = summary["report_layer"]
    at = traj[traj.layer == last]
    aligned_harm = at[at.step == 0].groupby("arm").harmful_rate.mean()
    final = at[at.step == SMALL.steps].set_index(["arm", "seed"])
    # 1. harmfulness after fine-tuning is above harmfulness after alignment
    assert final.loc["none"].harmful_rate.mean() - aligned_harm["none"] > 0.15
    # 2. alignment in the none arm is above the isotropic p99, on average over seeds and steps
    tracked = at[at.step > 0]
    iso = tracked.null_p99_isotropic.iloc[0]
    assert tracked[tracked.arm == "none"].cos.mean() > iso + 0.1
    # 3. blocking v_rev turns the alignment negative and lowers harmfulness, seed by seed
    assert tracked[tracked.arm == "grad:v_rev"].cos.mean() < 0
    paired = final.loc["grad:v_rev"].harmful_rate - final.loc["none"].harmful_rate
    assert paired.mean() < -0.03
    # the files the demo promises
    from safetensors.torch import load_file

    seed0 = small_run / "runs" / "seed0"
    assert load_file(seed0 / "history" / "base.safetensors")["mean"].shape == (2, 48)
    assert load_file(seed0 / "direction.safetensors")["v_rev"].shape == (2, 48)
    assert sorted(load_file(seed0 / "none" / "means.safetensors")) == ["step_1", "step_100", "step_20", "step_5"]
    assert "| final alignment, no block |" in (small_run / "summary.md").read_text()


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_is_identical(small_run):
    before = (small_run / "trajectories.csv").read_bytes()
    done = small_run / "runs" / "seed0" / "none" / "done.json"
    stamp = done.stat().st_mtime_ns
    run_experiment(SMALL, small_run, SerialExecutor(), log=None)
    assert done.stat().st_mtime_ns == stamp  # not recomputed
    assert (small_run / "trajectories.csv").read_bytes() == before


@pytest.mark.slow
def test_notebook_executes(tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    env_setup = nbformat.v4.new_code_cell("import os; os.environ['RL_NOTEBOOK_SMALL'] = '1'")
    nb.cells.insert(0, env_setup)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    figs = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figs) == 3  # readout, heatmap, curves rendered inline


def test_cli_demo_help():
    out = subprocess.run([sys.executable, "-m", "reversion_lens.cli", "demo", "--help"], capture_output=True, text=True,
                         env={**os.environ}, cwd=ROOT, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "--quick" in out.stdout and "--preset" in out.stdout


def test_summary_folds_the_per_layer_shares_of_a_deep_model(small_run):
    import json

    from reversion_lens.pipeline.results import render_markdown

    s = json.loads((small_run / "summary.json").read_text())
    assert "<details>" not in render_markdown(s)  # two layers: every row shown
    one = next(iter(s["shares"]["none"].values()))
    s["layers"], s["report_layer"] = list(range(30)), 29
    s["shares"] = {arm: {str(lay): dict(one) for lay in range(30)} for arm in s["shares"]}
    md = render_markdown(s)
    visible, folded = md.split("<details>")
    assert visible.count("| `none` | 29 |") == 1 and folded.count("| `none` |") == 30


def test_the_committed_notebook_is_executed():
    """The repository page shows outputs: every code cell ran, none failed, the figures carry a PNG."""
    nb = nbformat.read(ROOT / "notebooks" / "explore.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "run `python notebooks/build.py` and commit"
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    figs = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figs) == 3 and all("image/png" in o["data"] for o in figs)
