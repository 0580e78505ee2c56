"""Aggregating a results folder: ``trajectories.csv``, ``summary.json`` and ``summary.md``.

Everything here reads the per-run files the runner wrote; nothing runs a model. Statistics across
seeds are mean ± std (ddof=1); arms are compared by paired per-seed differences (every arm of a seed
starts from the same aligned checkpoint and sees the same fine-tuning batches).
"""

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ResultsFormatError
from .experiments import ExperimentConfig, run_dir, write_rows_csv
from .io import atomic_write_text, read_json, write_json
from .stats import format_mean_std, mean_std, paired_differences, spearman

__all__ = ["aggregate", "load_trajectories", "summarize", "render_markdown", "per_layer_table", "PAPER"]

#: The paper's headline numbers (arXiv:2606.28525), shown beside ours.
PAPER = {
    "cos_step1": 0.43,
    "cos_step20": 0.65,
    "share_above_isotropic_p99": 1.0,
    "final_cos_none": 0.65,
    "final_cos_block": -0.21,
    "harmful_none": 0.19,
    "harmful_block": 0.085,
}


def load_trajectories(out: str | os.PathLike) -> pd.DataFrame:
    path = Path(out) / "trajectories.csv"
    if not path.exists():
        raise ResultsFormatError(f"{path} does not exist; run the experiment (reversion-lens demo --out {out}) first.")
    return pd.read_csv(path)


def aggregate(out: str | os.PathLike, config: ExperimentConfig) -> dict[str, Any]:
    """Concatenate the runs' trajectories and write the summary files; returns the summary."""
    from .toyworld.runner import TRAJECTORY_COLUMNS

    out = Path(out)
    frames = []
    for seed in config.seeds:
        for arm in config.arms:
            path = run_dir(out, seed, arm) / "trajectory.csv"
            if not (path.parent / "done.json").exists():
                raise ResultsFormatError(f"run {path.parent} is not complete; rerun the experiment to finish it.")
            frames.append(pd.read_csv(path))
    traj = pd.concat(frames, ignore_index=True).sort_values(["seed", "arm", "step", "layer"], kind="stable")
    write_rows_csv(out / "trajectories.csv", traj.to_dict("records"), TRAJECTORY_COLUMNS)
    seed_info = {s: read_json(out / "runs" / f"seed{s}" / "seed.json") for s in config.seeds}
    summary = summarize(pd.read_csv(out / "trajectories.csv"), config, seed_info)
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", render_markdown(summary))
    return summary


def _ms(values: Any) -> dict[str, Any]:
    vals = [float(x) for x in values if x == x]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    m, s = mean_std(vals)
    return {"mean": m, "std": None if math.isnan(s) else s, "n": len(vals)}


def summarize(traj: pd.DataFrame, config: ExperimentConfig, seed_info: dict[int, Any]) -> dict[str, Any]:
    layers = sorted(traj.layer.unique().tolist())
    layer = config.report_layer if config.report_layer is not None else layers[-1]
    T = config.steps
    tracked = traj[traj.step.isin(config.track_steps) & traj.step.gt(0)]
    arms = list(config.arms)

    def cos_at(arm: str, step: int, lay: int = layer) -> dict[str, Any]:
        sel = traj[(traj.arm == arm) & (traj.step == step) & (traj.layer == lay)]
        return _ms(sel.cos)

    def final_eval(arm: str, col: str) -> pd.Series:
        ev = traj[(traj.arm == arm) & (traj.step == T) & (traj.layer == layer)].set_index("seed")[col]
        return ev.sort_index()

    # alignment over steps, per arm, at the report layer
    alignment = {arm: {int(s): cos_at(arm, int(s)) for s in config.track_steps if s > 0} for arm in arms}
    # shares of run-step pairs above the nulls, per layer and arm
    control_arm = next((a for a in arms if a.startswith("control:")), None)
    shares: dict[str, Any] = {}
    for arm in arms:
        per_layer = {}
        for lay in layers:
            sel = tracked[(tracked.arm == arm) & (tracked.layer == lay)]
            entry = {
                "n": int(len(sel)),
                "above_isotropic_p99": float((sel.cos > sel.null_p99_isotropic).mean()) if len(sel) else None,
                "above_matched_p99": float((sel.cos > sel.null_p99_matched).mean()) if len(sel) else None,
            }
            if control_arm is not None:
                ctrl = tracked[(tracked.arm == control_arm) & (tracked.layer == lay)].cos.dropna()
                p99 = float(np.quantile(ctrl, 0.99)) if len(ctrl) else None
                entry["control_p99"] = p99
                entry["above_control_p99"] = float((sel.cos > p99).mean()) if p99 is not None and len(sel) else None
            per_layer[int(lay)] = entry
        shares[arm] = per_layer
    # outcomes at T and paired differences against "none"
    outcomes: dict[str, Any] = {}
    for arm in arms:
        o = {"final_cos": cos_at(arm, T)}
        for col in ("harmful_rate", "task_accuracy", "task_loss", "weight_cos"):
            o[col] = _ms(final_eval(arm, col))
        if arm != "none" and "none" in arms:
            for col in ("harmful_rate", "task_accuracy", "task_loss"):
                a, b = final_eval(arm, col), final_eval("none", col)
                common = a.index.intersection(b.index)
                if len(common):
                    d = paired_differences(a[common].tolist(), b[common].tolist())
                    o[f"{col}_minus_none"] = {"mean": d["mean"], "std": None if math.isnan(d["std"]) else d["std"], "n": d["n"]}
            fc = traj[(traj.step == T) & (traj.layer == layer)].pivot_table(index="seed", columns="arm", values="cos")
            if arm in fc and "none" in fc:
                d = paired_differences(fc[arm].dropna().tolist(), fc["none"].loc[fc[arm].dropna().index].tolist())
                o["final_cos_minus_none"] = {"mean": d["mean"], "std": None if math.isnan(d["std"]) else d["std"], "n": d["n"]}
        outcomes[arm] = o
    # history checkpoints
    history = {
        name: {k: _ms([seed_info[s]["evals"][name][k] for s in seed_info]) for k in ("harmful_rate", "task_accuracy")}
        for name in ("base", "aligned")
    }
    # Spearman of alignment against harmfulness across runs and evaluated steps (report layer, step > 0)
    ev = traj[(traj.layer == layer) & traj.harmful_rate.notna() & traj.cos.notna()]
    rho, p = spearman(ev.cos.tolist(), ev.harmful_rate.tolist()) if len(ev) > 2 else (float("nan"), float("nan"))
    return {
        # Only the fields that change the numbers: workers, threads and the cache folder are in config.json,
        # so a run resumed with other workers (or on another machine) writes the same summary.json bytes.
        "config": config.result_fields(),
        "config_hash": config.hash(),
        "n_seeds": len(config.seeds),
        "layers": layers,
        "report_layer": int(layer),
        "d_model": int(next(iter(seed_info.values()))["d_model"]),
        "null_p99_isotropic": next(iter(seed_info.values()))["null_p99_isotropic"][0],
        "history": history,
        "alignment": alignment,
        "shares": shares,
        "outcomes": outcomes,
        "spearman_alignment_harm": {"rho": rho, "p": p, "n": int(len(ev))},
        "paper": PAPER,
    }


def _f(entry: dict[str, Any] | None, pct: bool = False, digits: int = 2) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    m, s = entry["mean"], entry.get("std")
    s = float("nan") if s is None else s
    return format_mean_std(m, s, digits=1 if pct else digits, percent=pct)


def _pts(entry: dict[str, Any] | None) -> str:
    """A paired difference of two rates, in percentage points."""
    return _f(entry, pct=True).replace("%", " pts") if entry and entry.get("mean") is not None else "n/a"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def render_markdown(s: dict[str, Any]) -> str:
    L, T = s["report_layer"], s["config"]["steps"]
    out = s["outcomes"]
    arms = list(out)
    blk = "grad:v_rev" if "grad:v_rev" in out else None
    lines = [
        "# Fine-tuning reversion: summary",
        "",
        f"{s['n_seeds']} seeds, mean ± std across seeds; alignment = cosine(drift, v_rev) at layer {L} "
        f"({s['config']['site']}, d_model {s['d_model']}, isotropic p99 {s['null_p99_isotropic']:.3f}); "
        f"T = {T} fine-tuning steps; preset `{s['config']['preset']}`.",
        "",
        "## The paper's claims beside ours",
        "",
        "| claim | paper | ours |",
        "| --- | --- | --- |",
    ]
    none = s["alignment"].get("none", {})
    if none:
        first = min(none)
        lines.append(f"| alignment after step {first} (`none`) | {PAPER['cos_step1']:.2f} | {_f(none.get(first))} |")
        if 20 in none:
            lines.append(f"| alignment at step 20 (`none`) | {PAPER['cos_step20']:.2f} | {_f(none.get(20))} |")
    if "none" in s["shares"]:
        sh = s["shares"]["none"][L]
        lines.append(f"| run-step pairs above the isotropic p99 (`none`, layer {L}) | every one | {_pct(sh['above_isotropic_p99'])} of {sh['n']} |")
        lines.append(f"| run-step pairs above the covariance-matched p99 | – | {_pct(sh['above_matched_p99'])} |")
        if "above_control_p99" in sh:
            lines.append(f"| run-step pairs above the control arm's p99 ({sh['control_p99']:.2f}) | – | {_pct(sh['above_control_p99'])} |")
    if "none" in out:
        lines.append(f"| final alignment, no block | {PAPER['final_cos_none']:.2f} | {_f(out['none']['final_cos'])} |")
    if blk:
        lines.append(f"| final alignment, `grad:v_rev` block | {PAPER['final_cos_block']:.2f} | {_f(out[blk]['final_cos'])} |")
    if "grad:random" in out:
        lines.append(f"| final alignment, `grad:random` block | – | {_f(out['grad:random']['final_cos'])} |")
    if "none" in out:
        lines.append(f"| harmfulness after fine-tuning, no block | {100 * PAPER['harmful_none']:.1f}% | {_f(out['none']['harmful_rate'], pct=True)} |")
    if blk:
        lines.append(f"| harmfulness, `grad:v_rev` block | {100 * PAPER['harmful_block']:.1f}% | {_f(out[blk]['harmful_rate'], pct=True)} |")
        lines.append(f"| paired difference, block − none (per seed) | −10.5 pts | {_pts(out[blk].get('harmful_rate_minus_none'))} |")
    lines += [
        "",
        "## Per arm at step T",
        "",
        "| arm | final alignment | harmful | paired Δ harmful vs none | task accuracy | Δ task accuracy | task loss | weight-space cos |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm in arms:
        o = out[arm]
        lines.append(
            f"| `{arm}` | {_f(o['final_cos'])} | {_f(o['harmful_rate'], pct=True)} | "
            f"{_pts(o.get('harmful_rate_minus_none'))} | {_f(o['task_accuracy'], pct=True)} | "
            f"{_pts(o.get('task_accuracy_minus_none'))} | {_f(o['task_loss'], digits=4)} | {_f(o['weight_cos'])} |"
        )
    h = s["history"]
    lines += [
        "",
        "## The history",
        "",
        f"harmfulness after pretraining (`base`) {_f(h['base']['harmful_rate'], pct=True)}, after alignment "
        f"{_f(h['aligned']['harmful_rate'], pct=True)}; benign accuracy {_f(h['base']['task_accuracy'], pct=True)} → "
        f"{_f(h['aligned']['task_accuracy'], pct=True)}.",
        "",
        "## Shares of run-step pairs above each null, per layer",
        "",
        "| arm | layer | n | > isotropic p99 | > matched p99 | > control p99 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm in arms:
        for lay, e in s["shares"][arm].items():
            lines.append(
                f"| `{arm}` | {lay} | {e['n']} | {_pct(e['above_isotropic_p99'])} | {_pct(e['above_matched_p99'])} | "
                f"{_pct(e.get('above_control_p99'))} |"
            )
    sp = s["spearman_alignment_harm"]
    lines += [
        "",
        f"Spearman ρ between alignment (layer {L}) and harmfulness across runs and evaluated steps: "
        f"{sp['rho']:.2f} (p = {sp['p']:.2g}, n = {sp['n']}).",
        "",
    ]
    return "\n".join(lines)


def per_layer_table(out: str | os.PathLike, config: ExperimentConfig) -> pd.DataFrame:
    """For a per-layer ablation (arms ``<mode>:v_rev@<layer>``, ``<mode>:v_rev``, ``<mode>:random``,
    ``none``): one row per (seed, blocked) with the final ``harmful_rate`` and ``final_cos`` at the report
    layer; ``blocked`` is the layer index as text, ``all``, ``random`` or ``none``. Written to
    ``out/per_layer.csv``."""
    from .experiments import Arm

    traj = load_trajectories(out)
    layer = config.report_layer if config.report_layer is not None else int(traj.layer.max())
    final = traj[(traj.step == config.steps) & (traj.layer == layer)]
    rows = []
    for arm_name in config.arms:
        arm = Arm.parse(arm_name)
        if arm.mode is None and arm.data == "benign":
            blocked = "none"
        elif arm.direction == "random":
            blocked = "random"
        elif arm.direction == "v_rev" and arm.layers is None:
            blocked = "all"
        elif arm.direction == "v_rev" and len(arm.layers) == 1:
            blocked = str(arm.layers[0])
        else:
            continue
        for r in final[final.arm == arm_name].itertuples():
            rows.append({"seed": int(r.seed), "blocked": blocked, "arm": arm_name, "harmful_rate": r.harmful_rate, "final_cos": r.cos})
    table = pd.DataFrame(rows)
    write_rows_csv(Path(out) / "per_layer.csv", rows, ["seed", "blocked", "arm", "harmful_rate", "final_cos"])
    return table
