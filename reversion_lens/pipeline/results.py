"""Aggregating a results folder: ``trajectories.csv``, ``summary.json`` and ``summary.md``.

Everything here reads the per-run files the runner wrote; nothing runs a model. Statistics across seeds
are mean, std (ddof=1), a 95% percentile-bootstrap interval and the per-seed values
(:func:`reversion_lens.stats.describe`); arms are compared with ``none`` by paired per-seed differences
(every arm of a seed starts from the same aligned checkpoint and sees the same fine-tuning batches), with
a sign-flip permutation test and a paired t-test (:func:`reversion_lens.stats.paired_test`). Shares of
run-step pairs above each null loop over the ``null_p99_<name>`` columns; the ``control:`` arm's own
p99 is a further, empirical null.
"""

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ResultsFormatError
from ..io import atomic_write_text, read_json, write_csv, write_json
from ..stats import describe, paired_test, spearman
from .arms import Arm
from .config import ExperimentConfig
from .layout import run_dir, trajectory_columns
from .setting import METRICS

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
    "paired_block": -0.105,
    "spearman": 0.958,
}

#: Outcomes summarised per arm at step T (those a setting measured), and compared with ``none``.
OUTCOMES = ("harmful_rate", "over_refusal_rate", "task_accuracy", "task_loss", "task_kl", "refusal_prob", "weight_cos")


def load_trajectories(out: str | os.PathLike) -> pd.DataFrame:
    path = Path(out) / "trajectories.csv"
    if not path.exists():
        raise ResultsFormatError(
            f"{path} does not exist; run the experiment (reversion-lens run / demo --out {out}) first."
        )
    return pd.read_csv(path)


def aggregate(out: str | os.PathLike, config: ExperimentConfig) -> dict[str, Any]:
    """Concatenate the runs' trajectories and write the summary files; returns the summary."""
    out = Path(out)
    frames = []
    for seed in config.seeds:
        for arm in config.arms:
            path = run_dir(out, seed, arm) / "trajectory.csv"
            if not (path.parent / "done.json").exists():
                raise ResultsFormatError(f"run {path.parent} is not complete; rerun the experiment to finish it.")
            frames.append(pd.read_csv(path))
    traj = pd.concat(frames, ignore_index=True).sort_values(["seed", "arm", "step", "layer"], kind="stable")
    write_csv(out / "trajectories.csv", traj.to_dict("records"), trajectory_columns())
    seed_info = {s: read_json(out / "runs" / f"seed{s}" / "seed.json") for s in config.seeds}
    summary = summarize(pd.read_csv(out / "trajectories.csv"), config, seed_info)
    write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", render_markdown(summary))
    return summary


def _nulls(traj: pd.DataFrame) -> list[str]:
    return [c.removeprefix("null_p99_") for c in traj.columns if c.startswith("null_p99_") and traj[c].notna().any()]


def _spearman(df: pd.DataFrame) -> dict[str, Any]:
    df = df[df.harmful_rate.notna() & df.cos.notna()]
    if len(df) <= 2:
        return {"rho": None, "p": None, "n": len(df)}
    rho, p = spearman(df.cos.tolist(), df.harmful_rate.tolist())
    clean = lambda x: None if math.isnan(x) else x
    return {"rho": clean(rho), "p": clean(p), "n": len(df)}


def summarize(traj: pd.DataFrame, config: ExperimentConfig, seed_info: dict[int, Any]) -> dict[str, Any]:
    layers = sorted(traj.layer.unique().tolist())
    layer = config.report_layer if config.report_layer is not None else layers[-1]
    T = config.steps
    tracked = traj[traj.step.isin(config.track_steps) & traj.step.gt(0)]
    arms = list(config.arms)
    nulls = _nulls(traj)
    control = next((a for a in arms if Arm.parse(a).is_control), None)

    def at(arm: str, step: int, col: str, lay: int = layer) -> pd.Series:
        sel = traj[(traj.arm == arm) & (traj.step == step) & (traj.layer == lay)]
        return sel.set_index("seed")[col].sort_index()

    alignment = {arm: {int(s): describe(at(arm, int(s), "cos")) for s in config.track_steps if s > 0} for arm in arms}
    shares: dict[str, Any] = {}
    for arm in arms:
        per_layer = {}
        for lay in layers:
            sel = tracked[(tracked.arm == arm) & (tracked.layer == lay)]
            entry: dict[str, Any] = {"n": len(sel)}
            for name in nulls:
                entry[f"above_{name}_p99"] = float((sel.cos > sel[f"null_p99_{name}"]).mean()) if len(sel) else None
            if control is not None:
                ctrl = tracked[(tracked.arm == control) & (tracked.layer == lay)].cos.dropna()
                p99 = float(np.quantile(ctrl, 0.99)) if len(ctrl) else None
                entry["control_p99"] = p99
                entry["above_control_p99"] = float((sel.cos > p99).mean()) if p99 is not None and len(sel) else None
            per_layer[int(lay)] = entry
        shares[arm] = per_layer
    measured = [c for c in OUTCOMES if c in traj and traj[traj.step == T][c].notna().any()]
    outcomes: dict[str, Any] = {}
    for arm in arms:
        o: dict[str, Any] = {"final_cos": describe(at(arm, T, "cos"))}
        for col in measured:
            o[col] = describe(at(arm, T, col))
        if arm != "none" and "none" in arms:
            for col in ("cos", *measured):
                a, b = at(arm, T, col).dropna(), at("none", T, col).dropna()
                common = a.index.intersection(b.index)
                if len(common):
                    key = "final_cos_minus_none" if col == "cos" else f"{col}_minus_none"
                    o[key] = paired_test(a[common].tolist(), b[common].tolist())
        outcomes[arm] = o
    evals = {name: [info["evals"][name] for info in seed_info.values()] for name in ("base", "aligned")}
    history = {name: {k: describe([e.get(k, float("nan")) for e in rows]) for k in METRICS
                      if any(e.get(k) is not None for e in rows)} for name, rows in evals.items()}  # fmt: skip
    ev = traj[(traj.layer == layer) & (traj.step > 0)]
    first = next(iter(seed_info.values()))
    return {
        # Only the fields that change the numbers: workers, threads and the cache folder are in config.json,
        # so a run resumed with other workers (or on another machine) writes the same summary.json bytes.
        "config": config.result_fields(),
        "config_hash": config.hash(),
        "setting": config.setting,
        "n_seeds": len(config.seeds),
        "layers": layers,
        "report_layer": int(layer),
        "d_model": int(first["d_model"]),
        "nulls": {name: first["nulls"][name] for name in nulls if name in first["nulls"]},
        "null_p99_isotropic": first["nulls"].get("isotropic", [None])[0],
        "history": history,
        "alignment": alignment,
        "shares": shares,
        "outcomes": outcomes,
        "spearman_alignment_harm": {"pooled": _spearman(ev), "per_arm": {a: _spearman(ev[ev.arm == a]) for a in arms}},
        "paper": PAPER,
    }


# ---------------------------------------------------------------------- markdown
def _num(x: float, pct: bool, digits: int) -> str:
    return f"{100 * x:.1f}" if pct else f"{x:.{digits}f}"


def _f(entry: dict[str, Any] | None, pct: bool = False, digits: int = 2, ci: bool = True) -> str:
    """``mean ± std [lo, hi]`` (percent: ``30.3 ± 21.1% [14.2, 47.8]``)."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    m, s = entry["mean"], entry.get("std")
    text = _num(m, pct, digits) + (f" ± {_num(s, pct, digits)}" if s is not None else "") + ("%" if pct else "")
    if ci and entry.get("ci"):
        lo, hi = entry["ci"]
        text += f" [{_num(lo, pct, digits)}, {_num(hi, pct, digits)}]"
    return text


def _pts(entry: dict[str, Any] | None, tests: bool = True) -> str:
    """A paired difference of two rates in percentage points, with its interval and p-values."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    text = _f(entry, pct=True).replace("%", " pts", 1)
    if tests and entry.get("p_signflip") is not None:
        text += f", p = {entry['p_signflip']:.2g} (sign-flip) / {entry['p_t']:.2g} (t)"
    return text


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _per_seed(entry: dict[str, Any] | None, pct: bool = True) -> str:
    if not entry or not entry.get("values"):
        return ""
    return " (per seed " + ", ".join(_num(v, pct, 2) for v in entry["values"]) + ")"


def _describe_setting(s: dict[str, Any]) -> str:
    table = s["config"].get(s["setting"], {})
    if s["setting"] in ("toy", "unlearning"):
        return f"setting `{s['setting']}`, preset `{table.get('preset', 'default')}`"
    if s["setting"] == "hf":
        return f"setting `hf`, base `{table.get('base')}`"
    return f"setting `{s['setting']}`"


def render_markdown(s: dict[str, Any]) -> str:
    L, T = s["report_layer"], s["config"]["steps"]
    out = s["outcomes"]
    arms = [a for a in s["config"].get("arms", out) if a in out]  # the config's order (JSON keys may be sorted)
    blk = "grad:v_rev" if "grad:v_rev" in out else None
    iso = s.get("null_p99_isotropic")
    lines = [
        "# Fine-tuning reversion: summary",
        "",
        f"{_describe_setting(s)}; {s['n_seeds']} seeds; mean ± std across seeds [95% bootstrap interval of the mean]; "
        f"alignment = cosine(drift, v_rev) at layer {L} ({s['config']['site']}, d_model {s['d_model']}"
        + (f", isotropic p99 {iso:.3f}" if iso is not None else "")
        + f"); T = {T} fine-tuning steps.",
        "",
        "## The paper's claims beside ours",
        "",
        "| claim | paper | ours |",
        "| --- | --- | --- |",
    ]
    none = s["alignment"].get("none", {})
    if none:
        first = min(none, key=int)
        lines.append(f"| alignment after step {first} (`none`) | {PAPER['cos_step1']:.2f} | {_f(none.get(first))} |")
        if 20 in none or "20" in none:
            lines.append(
                f"| alignment at step 20 (`none`) | {PAPER['cos_step20']:.2f} | {_f(none.get(20, none.get('20')))} |"
            )
    if "none" in s["shares"]:
        sh = s["shares"]["none"][L] if L in s["shares"]["none"] else s["shares"]["none"][str(L)]
        for name in s.get("nulls", {}):
            claim = "every one" if name == "isotropic" else "–"
            lines.append(f"| run-step pairs above the {name} null's p99 (`none`, layer {L}) | {claim} | "
                         f"{_pct(sh.get(f'above_{name}_p99'))} of {sh['n']} |")  # fmt: skip
        if sh.get("control_p99") is not None:
            lines.append(
                f"| run-step pairs above the control arm's p99 ({sh['control_p99']:.2f}) | – | {_pct(sh['above_control_p99'])} |"
            )
    if "none" in out:
        lines.append(f"| final alignment, no block | {PAPER['final_cos_none']:.2f} | {_f(out['none']['final_cos'])} |")
    if blk:
        lines.append(
            f"| final alignment, `grad:v_rev` block | {PAPER['final_cos_block']:.2f} | {_f(out[blk]['final_cos'])} |"
        )
    if "none" in out and "harmful_rate" in out["none"]:
        lines.append(f"| harmfulness after fine-tuning, no block | {100 * PAPER['harmful_none']:.1f}% | "
                     f"{_f(out['none']['harmful_rate'], pct=True)}{_per_seed(out['none']['harmful_rate'])} |")  # fmt: skip
        if blk:
            lines.append(f"| harmfulness, `grad:v_rev` block | {100 * PAPER['harmful_block']:.1f}% | "
                         f"{_f(out[blk]['harmful_rate'], pct=True)}{_per_seed(out[blk]['harmful_rate'])} |")  # fmt: skip
            lines.append(f"| paired difference, block − none (per seed) | {100 * PAPER['paired_block']:.1f} pts | "
                         f"{_pts(out[blk].get('harmful_rate_minus_none'))} |")  # fmt: skip
    sp = s["spearman_alignment_harm"]["pooled"]
    if sp.get("rho") is not None:
        lines.append(f"| Spearman ρ(alignment, harm), runs × evaluated steps | {PAPER['spearman']} | {sp['rho']:.2f} "
                     f"(p = {sp['p']:.2g}, n = {sp['n']}) |")  # fmt: skip
    cols = [c for c in ("harmful_rate", "over_refusal_rate", "task_accuracy", "task_loss", "task_kl", "weight_cos")
            if any(c in o for o in out.values())]  # fmt: skip
    pct_cols = {"harmful_rate", "over_refusal_rate", "task_accuracy"}
    names = {"harmful_rate": "harmful", "over_refusal_rate": "over-refusal", "task_accuracy": "task accuracy",
             "task_loss": "task loss", "task_kl": "task KL", "weight_cos": "weight-space cos"}  # fmt: skip
    lines += ["", "## Per arm at step T", "",
              "| arm | final alignment | " + " | ".join(names[c] for c in cols) + " |",
              "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]  # fmt: skip
    for arm in arms:
        o = out[arm]
        cells = [_f(o.get(c), pct=c in pct_cols, digits=4 if c in ("task_loss", "task_kl") else 2) for c in cols]
        lines.append(f"| `{arm}` | {_f(o['final_cos'])} | " + " | ".join(cells) + " |")
    paired = [c for c in ("harmful_rate", "over_refusal_rate", "task_accuracy", "task_loss", "task_kl") if c in cols]
    if "none" in out and len(arms) > 1:
        lines += ["", "## Paired differences against `none` (per seed, same data order)", "",
                  "| arm | Δ final alignment | " + " | ".join(f"Δ {names[c]}" for c in paired) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in paired) + " |"]  # fmt: skip
        for arm in arms:
            if arm == "none":
                continue
            o = out[arm]
            cells = [(_pts(o.get(f"{c}_minus_none")) if c in pct_cols else _f(o.get(f"{c}_minus_none"), digits=4))
                     for c in paired]  # fmt: skip
            lines.append(f"| `{arm}` | {_f(o.get('final_cos_minus_none'))} | " + " | ".join(cells) + " |")
    h = s["history"]
    if "harmful_rate" in h.get("base", {}):
        lines += ["", "## The history", "",
                  f"harmfulness of `base` {_f(h['base']['harmful_rate'], pct=True)}, of `aligned` "
                  f"{_f(h['aligned']['harmful_rate'], pct=True)}"
                  + (f"; over-refusal {_f(h['base'].get('over_refusal_rate'), pct=True)} → "
                     f"{_f(h['aligned'].get('over_refusal_rate'), pct=True)}" if "over_refusal_rate" in h["base"] else "")
                  + (f"; task accuracy {_f(h['base'].get('task_accuracy'), pct=True)} → "
                     f"{_f(h['aligned'].get('task_accuracy'), pct=True)}" if "task_accuracy" in h["base"] else "")
                  + "."]  # fmt: skip
    nulls = list(s.get("nulls", {}))
    many = len(s["layers"]) > 8  # a 30-layer model: fold the per-layer rows away, keep the report layer visible
    lines += ["", "## Shares of run-step pairs above each null, per layer", ""]
    header = ["| arm | layer | n | " + " | ".join(f"> {n} p99" for n in nulls) + " | > control p99 |",
              "| --- | --- | --- | " + " | ".join("---" for _ in nulls) + " | --- |"]  # fmt: skip

    def share_row(arm: str, lay: Any, e: dict[str, Any]) -> str:
        cells = " | ".join(_pct(e.get(f"above_{n}_p99")) for n in nulls)
        return f"| `{arm}` | {lay} | {e['n']} | {cells} | {_pct(e.get('above_control_p99'))} |"

    if many:
        lines += [f"At the report layer {L}:", "", *header]
        lines += [share_row(arm, L, e) for arm in arms for lay, e in s["shares"][arm].items() if int(lay) == L]
        lines += ["", f"<details><summary>every layer ({len(s['layers'])})</summary>", ""]
    lines += header
    lines += [share_row(arm, lay, e) for arm in arms for lay, e in s["shares"][arm].items()]
    if many:
        lines += ["", "</details>"]
    per_arm = s["spearman_alignment_harm"]["per_arm"]
    rows = [f"`{a}` {r['rho']:.2f} (n = {r['n']})" for a, r in per_arm.items() if r.get("rho") is not None]
    if rows:
        lines += ["", f"Spearman ρ between alignment (layer {L}) and harmfulness, per arm: " + "; ".join(rows) + "."]
    lines.append("")
    return "\n".join(lines)


def per_layer_table(out: str | os.PathLike, config: ExperimentConfig) -> pd.DataFrame:
    """For a per-layer ablation (arms ``<mode>:v_rev@<layer>``, ``<mode>:v_rev``, ``<mode>:random``,
    ``none``): one row per (seed, blocked) with the final ``harmful_rate`` and ``final_cos`` at the report
    layer; ``blocked`` is the layer index as text, ``all``, ``random`` or ``none``. Written to
    ``out/per_layer.csv``."""
    traj = load_trajectories(out)
    layer = config.report_layer if config.report_layer is not None else int(traj.layer.max())
    final = traj[(traj.step == config.steps) & (traj.layer == layer)]
    rows = []
    for arm_name in config.arms:
        arm = Arm.parse(arm_name)
        if arm.mode is None and not arm.is_control:
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
            rows.append({"seed": int(r.seed), "blocked": blocked, "arm": arm_name, "harmful_rate": r.harmful_rate,
                         "final_cos": r.cos})  # fmt: skip
    table = pd.DataFrame(rows)
    write_csv(Path(out) / "per_layer.csv", rows, ["seed", "blocked", "arm", "harmful_rate", "final_cos"])
    return table
