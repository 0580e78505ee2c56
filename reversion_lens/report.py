"""From a results folder to the paper's figures: tables in, ``plotly`` figures out.

:func:`build_figures` reads the tables a run wrote and calls the builders in
:mod:`reversion_lens.figures`; :func:`write_report` also writes them (HTML and PNG) with
:func:`reversion_lens.export.write_figures`. Used by ``reversion-lens demo`` and
``analyses/make_figures.py``.
"""

import os
from pathlib import Path
from typing import Any

import pandas as pd

from . import figures
from .errors import ResultsFormatError
from .io import read_json

__all__ = ["runs_table", "build_figures", "write_report"]


def runs_table(traj: pd.DataFrame, layer: int, step: int | None = None) -> pd.DataFrame:
    """One row per (seed, arm) at the last step: ``final_cos`` at ``layer`` and the final evaluations."""
    step = int(traj.step.max()) if step is None else step
    sel = traj[(traj.step == step) & (traj.layer == layer)]
    cols = ["seed", "arm", "cos", "harmful_rate", "task_accuracy", "task_loss"]
    return sel[cols].rename(columns={"cos": "final_cos"}).reset_index(drop=True)


def build_figures(results: str | os.PathLike) -> dict[str, Any]:
    """Every figure for one results folder, keyed by file stem."""
    results = Path(results)
    traj_path = results / "trajectories.csv"
    if not traj_path.exists():
        raise ResultsFormatError(f"{traj_path} not found; is {results} a results folder (reversion-lens demo --out)?")
    traj = pd.read_csv(traj_path)
    summary = read_json(results / "summary.json")
    layer = int(summary["report_layer"])
    d_model = int(summary["d_model"])
    figs: dict[str, Any] = {
        "alignment_heatmap": figures.alignment_heatmap(traj),
        "alignment_curves": figures.alignment_curves(traj, layer=layer),
        "ablation_summary": figures.ablation_summary(runs_table(traj, layer)),
        "harm_vs_alignment": figures.harm_vs_alignment(traj, layer=layer),
    }
    obs = traj[(traj.arm == "none") & (traj.layer == layer) & traj.cos.notna() & (traj.step > 0)]
    if len(obs):
        figs["null_comparison"] = figures.null_comparison(obs, d_model=d_model, label="isotropic")
    seeds = sorted(traj.seed.unique())
    vocab = results / "runs" / f"seed{seeds[0]}" / "vocab.csv"
    if vocab.exists():
        figs["vocab_readout"] = figures.vocab_readout(pd.read_csv(vocab, keep_default_na=False), layer=layer)
    ablation = results / "per_layer.csv"
    if ablation.exists():
        figs["per_layer_ablation"] = figures.per_layer_ablation(pd.read_csv(ablation, dtype={"blocked": str}))
    return figs


def write_report(results: str | os.PathLike, out: str | os.PathLike | None = None, formats: tuple[str, ...] = ("html", "png")) -> dict[str, list[Path]]:
    """Build every figure of ``results`` and write them into ``out`` (default ``results/figures``)."""
    from .export import write_figures

    out = Path(out) if out is not None else Path(results) / "figures"
    return write_figures(build_figures(results), out, formats=formats)
