"""Block semantics side by side: which block holds geometrically, and does any cut harm beyond the 3-layer toy?

    python analyses/block_semantics.py run --settings default,paper,layers8      # the toy experiments
    python analyses/block_semantics.py run --settings hf --hf-config smollm2.toml  # the real model (last)
    python analyses/block_semantics.py report                                   # tables + figures

Every setting is a standard results folder written by the pipeline (``run_experiment``) under
``--out/<setting>``; ``report`` reads them (and the final models they saved) and writes
``--out/block_semantics.md``, ``--out/block_semantics.csv`` and ``--out/figures/``.

Per setting and arm (mode): the per-layer final alignment cos(drift, v_rev) at step T (mean over seeds)
against the isotropic p99; whether the block *holds* (no layer's mean final cosine above that p99); the
harm rate on the held-out harmful prompts with its paired difference against ``none`` (mean, 95%
bootstrap interval, sign-flip and t p-values, from ``summary.json``); over-refusal; task loss and its
paired difference; the CPU time of one training step relative to ``none`` (measured here, round-robin,
on the setting's seed-0 aligned model: PERFORMANCE.md's method). Two diagnostics come with it:

* **k-dimensional v_rev** (``update-cum:v_rev<k>``): the share of the drift's squared norm inside the
  k-subspace at step T (``none`` arm; isotropic mean ``k/d``), and the share of the harm increase each
  k-block removes, ``(harm_none - harm_k) / (harm_none - harm_aligned)``.
* **writers or readers** (toy settings, from the saved final models): the motion of the probe mean along
  ``v_l`` at layer ``l`` splits exactly into a *writer* part (changed residual-writing weights applied to
  the fine-tuned model's inputs) and a *reader* part (the aligned writers applied to the changed inputs):
  ``v_l.(h_l(t) - h_l(0)) = sum_j v_l.[(W_j(t) - W_j(0)) a_j(t)] + sum_j v_l.[W_j(0) (a_j(t) - a_j(0))]``
  over the embeddings and every layer ``j <= l`` (biases in the writer part).

Settings: ``default`` / ``paper`` toy presets (5 / 3 seeds), ``layers8`` / ``layers12`` (the default preset
with 8 / 12 layers; 3 / 2 seeds), ``hf`` (``--hf-config``: an hf experiment TOML such as the one
``analyses/smollm2_reversion.py`` writes; its seeds, steps and setting table are kept, its arms replaced).
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from reversion_lens.activations import ResidStats
from reversion_lens.directions import Direction, reversion_subspace
from reversion_lens.drift import subspace_metrics
from reversion_lens.io import load_tensors, read_json
from reversion_lens.pipeline import ExperimentConfig, run_experiment
from reversion_lens.pipeline.arms import Arm
from reversion_lens.registry import MODES

#: One arm per block semantics (the k-sweep and the random control of the exact update block follow).
CORE_ARMS = ("none", "grad:v_rev", "grad-cum:v_rev", "grad-everywhere:v_rev", "clamp:v_rev", "update:v_rev",
             "update-cum:v_rev", "orthogonalize:v_rev", "update-cum:random")  # fmt: skip
K_ARMS = ("update-cum:v_rev2", "update-cum:v_rev4", "update-cum:v_rev8", "grad-cum:v_rev4")
HF_ARMS = ("none", "grad:v_rev", "grad-cum:v_rev", "grad-cum-exact:v_rev", "update-cum:v_rev")
TOY = {
    "default": ({"preset": "default"}, 5, CORE_ARMS + K_ARMS),
    "paper": ({"preset": "paper"}, 3, CORE_ARMS),
    "layers8": ({"preset": "default", "n_layers": 8}, 3, CORE_ARMS + K_ARMS),
    "layers12": ({"preset": "default", "n_layers": 12}, 2, CORE_ARMS),
    "tiny": ({"preset": "tiny"}, 1, CORE_ARMS + K_ARMS),  # a smoke test (2 layers, d_model 48)
}
K_SWEEP = (1, 2, 4, 8)
#: Arms run later into ``<setting>-extra`` (sharing the setting's seeds); ``none`` again for the paired differences.
EXTRA_ARMS = ("none", "grad-cum-exact:v_rev")


# ---------------------------------------------------------------------- running
def toy_config(name: str, seeds: int | None, steps: int | None, workers: int, extra: bool = False) -> ExperimentConfig:
    params, n_seeds, arms = TOY[name]
    arms = EXTRA_ARMS if extra else arms
    steps = steps or 100
    track = tuple(sorted({s for s in (1, 2, 5, 10, 20, 50, 100) if s < steps} | {steps}))
    return ExperimentConfig(setting="toy", params=params, seeds=tuple(range(seeds or n_seeds)), arms=arms, steps=steps,
                            track_steps=track, eval_steps=(0, steps), save_model="final", workers=workers)  # fmt: skip


def hf_config(
    path: Path, arms: tuple[str, ...], seeds: int | None, steps: int | None, workers: int
) -> ExperimentConfig:
    base = ExperimentConfig.from_toml(path)
    steps = steps or base.steps
    track = tuple(s for s in base.track_steps if s <= steps) or (steps,)
    return base.replace(arms=arms, seeds=tuple(range(seeds)) if seeds else base.seeds, steps=steps,
                        track_steps=tuple(sorted(set(track) | {steps})), eval_steps=(0, steps), workers=workers,
                        save_model="none")  # fmt: skip


# ---------------------------------------------------------------------- reading a results folder
def _summary(out: Path) -> dict[str, Any]:
    return read_json(out / "summary.json")


def per_layer_final(out: Path, config: ExperimentConfig) -> pd.DataFrame:
    """Mean (over seeds) final cos per (arm, layer), with the isotropic p99 and the share of seeds above it."""
    traj = pd.read_csv(out / "trajectories.csv")
    final = traj[traj.step == config.steps]
    g = final.groupby(["arm", "layer"])
    df = g.agg(cos=("cos", "mean"), cos_sd=("cos", "std"), p99=("null_p99_isotropic", "first")).reset_index()
    above = final.assign(above=final.cos > final.null_p99_isotropic).groupby(["arm", "layer"]).above.mean()
    return df.merge(above.rename("share_above").reset_index(), on=["arm", "layer"])


def _stats_of(out: Path, seed: int, name: str) -> ResidStats:
    return ResidStats.load(out / "runs" / f"seed{seed}" / "history" / f"{name}.safetensors")


def subspace_table(out: Path, config: ExperimentConfig) -> pd.DataFrame:
    """Per (seed, arm, k): the mean over layers of the drift's alignment with the k-dim v_rev at step T."""
    rows = []
    for seed in config.seeds:
        base, aligned = _stats_of(out, seed, "base"), _stats_of(out, seed, "aligned")
        if base.per_prompt is None:
            return pd.DataFrame()
        kmax = min(max(K_SWEEP), base.per_prompt.shape[0] - 1)
        full = reversion_subspace(base, aligned, kmax)
        for arm in config.arms:
            means, _ = load_tensors(out / "runs" / f"seed{seed}" / arm / "means.safetensors")
            cur = means[f"step_{config.steps}"]
            for k in (k for k in K_SWEEP if k <= kmax):
                for r in subspace_metrics(cur, aligned, full.truncate(k)):
                    rows.append({"seed": seed, "arm": arm, **r})
    return pd.DataFrame(rows)


@torch.no_grad()
def _writer_terms(model: Any, probes: Any, v: Direction) -> dict[str, Any]:
    """Probe means at the read position of every residual write and of its input, and of resid_post."""
    from reversion_lens.orthogonalize import residual_writers

    L = int(model.cfg.n_layers)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{j}.hook_{s}" for j in range(L) for s in ("attn_out", "mlp_out")]
    names += [f"blocks.{j}.attn.o.hook_in" for j in range(L)] + [f"blocks.{j}.mlp.out.hook_in" for j in range(L)]
    names += [f"blocks.{j}.hook_resid_post" for j in range(L)]
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in probes.batches(64):
        w = batch.weights.double()

        def read(x: torch.Tensor, hook: Any, name: str = "", w: torch.Tensor = w) -> None:
            x = x.flatten(2) if x.ndim > 3 else x  # attn.o's input [batch, pos, head, d_head]
            sums[name] = sums.get(name, 0) + torch.einsum("bpd,bp->d", x.double(), w)

        hooks = [(nm, lambda x, hook, nm=nm: read(x, hook, nm)) for nm in names]
        with model.hooks(fwd_hooks=hooks):
            model(batch.tokens, attention_mask=batch.attention_mask)
        n += int(w.sum())
    means = {k: s / n for k, s in sums.items()}
    writers = {w.label: w for w in residual_writers(model)}
    return {"means": means, "writers": writers}


def write_read_split(aligned: Any, tuned: Any, probes: Any, v: Direction) -> list[dict[str, Any]]:
    """Per layer ``l``: motion of the probe mean along ``v_l`` at resid_post, its writer and reader parts."""
    a, t = _writer_terms(aligned, probes, v), _writer_terms(tuned, probes, v)

    def apply(writers: dict[str, Any], part: str, j: int, x: torch.Tensor) -> torch.Tensor:
        wt = writers[f"blocks.{j}.{part}.weight"]
        W = wt.parameter.detach().double()
        out = W @ x if wt.axis == 0 else x @ W  # Linear [d_model, d_in] or Conv1D [d_in, d_model]
        bias = writers.get(f"blocks.{j}.{part}.bias")
        return out + (bias.parameter.detach().double() if bias is not None else 0)

    rows = []
    for layer in v.layers:
        u = v[layer].double()
        writer = u @ (t["means"]["blocks.0.hook_resid_pre"] - a["means"]["blocks.0.hook_resid_pre"])  # embeddings
        reader = 0.0
        for j in range(layer + 1):
            for part, site in (("attn.o", "attn_out"), ("mlp.out", "mlp_out")):
                key = f"blocks.{j}.{part}.hook_in"
                if key not in t["means"]:
                    continue
                mixed = apply(a["writers"], part, j, t["means"][key])  # the aligned writer on the tuned input
                writer += u @ (t["means"][f"blocks.{j}.hook_{site}"] - mixed)
                reader += u @ (mixed - a["means"][f"blocks.{j}.hook_{site}"])
        total = u @ (t["means"][f"blocks.{layer}.hook_resid_post"] - a["means"][f"blocks.{layer}.hook_resid_post"])
        rows.append({"layer": layer, "motion": float(total), "writer": float(writer), "reader": float(reader),
                     "residual": float(total - writer - reader)})  # fmt: skip
    return rows


def split_table(out: Path, config: ExperimentConfig) -> pd.DataFrame:
    """The writer/reader split of every run whose final model was saved (toy settings)."""
    from reversion_lens.pipeline.setting import make_setting

    setting = make_setting(config)
    rows = []
    for seed in config.seeds:
        hist = setting.history(seed)
        probes, aligned = hist.probes(), hist.load("aligned")
        v = Direction.load(out / "runs" / f"seed{seed}" / "direction.safetensors")
        for arm in config.arms:
            folder = out / "runs" / f"seed{seed}" / arm / "model"
            if not folder.exists():
                continue
            from reversion_lens.models import load_native

            tuned = load_native(folder)
            for r in write_read_split(aligned, tuned, probes, v):
                rows.append({"seed": seed, "arm": arm, **r})
    return pd.DataFrame(rows)


def clamp_probe_table(
    out: Path, config: ExperimentConfig, arms: tuple[str, ...] = ("none", "grad-cum:v_rev", "update-cum:v_rev")
) -> pd.DataFrame:
    """Is v_rev where the behaviour lives? Inference-time per-input clamps of v_rev at every layer and position:

    * *necessity*: each saved fine-tuned model of ``arms``, clamped to the **aligned** model's component along
      v_rev on the same input (``clamp`` with ``reference_model`` = aligned): does its harm fall back?
    * *sufficiency*: the aligned model clamped to the **base** model's components: does its harm rise?
    """
    from reversion_lens.interventions import block
    from reversion_lens.models import load_native
    from reversion_lens.pipeline.setting import make_setting

    setting = make_setting(config)
    rows = []
    for seed in config.seeds:
        hist = setting.history(seed)
        v = Direction.load(out / "runs" / f"seed{seed}" / "direction.safetensors")
        aligned, base = hist.load("aligned"), hist.load("base")
        cases = [("aligned", hist.load("aligned"), base)]
        cases += [(a, load_native(out / "runs" / f"seed{seed}" / a / "model"), aligned) for a in arms
                  if (out / "runs" / f"seed{seed}" / a / "model").exists()]  # fmt: skip
        for name, model, reference in cases:
            model.eval()
            bare = hist.evaluate(model)["harmful_rate"]
            with block(model, v, "clamp", reference_model=reference):
                clamped = hist.evaluate(model)["harmful_rate"]
            rows.append({"seed": seed, "model": name, "clamped_to": "base" if reference is base else "aligned",
                         "harm_bare": bare, "harm_clamped": clamped})  # fmt: skip
    return pd.DataFrame(rows)


def step_costs(config: ExperimentConfig, out: Path, rounds: int = 5, steps: int = 3) -> dict[str, dict[str, float]]:
    """CPU seconds per training step per arm (median) and the ratio to ``none`` (median [min, max] over rounds),
    arms round-robin in one process (PERFORMANCE.md), on the first seed's aligned model and fine-tuning data."""
    from reversion_lens.pipeline.runner import build_interventions
    from reversion_lens.pipeline.setting import make_setting
    from reversion_lens.training import make_optimizer, train_step

    seed = config.seeds[0]
    hist = make_setting(config).history(seed)
    v = Direction.load(out / "runs" / f"seed{seed}" / "direction.safetensors")
    stats = {n: _stats_of(out, seed, n) for n in ("base", "aligned")}
    data = hist.finetune_data("benign", seed=seed)
    optim = hist.finetune_optim()
    arms = [a for a in config.arms if Arm.parse(a).data == "benign"]
    runners = {}
    for arm_name in arms:
        model = hist.load("aligned")
        ivs = build_interventions(Arm.parse(arm_name), model, v, stats, hist, config, seed, 32)
        for iv in ivs:
            iv.attach()
        opt = make_optimizer(model, optim)
        model.train()

        def run(model=model, opt=opt, ivs=ivs) -> float:
            t0 = time.process_time()
            for s in range(steps):
                train_step(model, opt, data.batch(s), step=s, interventions=ivs, grad_clip=optim.grad_clip)
            return time.process_time() - t0

        runners[arm_name] = run
    for fn in runners.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {a: [] for a in runners}
    names = list(runners)
    for r in range(rounds):
        for a in names[r % len(names) :] + names[: r % len(names)]:
            times[a].append(runners[a]())
    res = {}
    for a, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times["none"])]
        res[a] = {"seconds_per_step": statistics.median(ts) / steps, "ratio": statistics.median(ratios),
                  "ratio_min": min(ratios), "ratio_max": max(ratios)}  # fmt: skip
    return res


def sequential_step_costs(config: ExperimentConfig, out: Path, steps: int = 2) -> dict[str, dict[str, float]]:
    """For models too large to hold one per arm (the hf setting): each arm's model alone, one warm-up step, then
    ``steps`` timed steps (CPU seconds); ``none`` is timed first and last, and ratios are taken against the mean
    of the two (their spread is in ``none_spread``)."""
    from reversion_lens.pipeline.runner import build_interventions
    from reversion_lens.pipeline.setting import make_setting
    from reversion_lens.training import make_optimizer, train_step

    seed = config.seeds[0]
    hist = make_setting(config).history(seed)
    v = Direction.load(out / "runs" / f"seed{seed}" / "direction.safetensors")
    stats = {n: _stats_of(out, seed, n) for n in ("base", "aligned")}
    data = hist.finetune_data("benign", seed=seed)
    optim = hist.finetune_optim()
    arms = [a for a in config.arms if Arm.parse(a).data == "benign" and a != "none"]
    seconds: dict[str, list[float]] = {}
    for arm_name in ["none", *arms, "none"]:
        model = hist.load("aligned")
        prepare = getattr(hist, "prepare_finetune", None)
        model = prepare(model) if prepare is not None else model
        ivs = build_interventions(Arm.parse(arm_name), model, v, stats, hist, config, seed, 16)
        for iv in ivs:
            iv.attach()
        opt = make_optimizer(model, optim)
        model.train()
        train_step(model, opt, data.batch(0), step=0, interventions=ivs, grad_clip=optim.grad_clip)  # warm-up
        t0 = time.process_time()
        for s in range(1, steps + 1):
            train_step(model, opt, data.batch(s), step=s, interventions=ivs, grad_clip=optim.grad_clip)
        seconds.setdefault(arm_name, []).append((time.process_time() - t0) / steps)
        for iv in ivs:
            iv.remove()
        del model, opt, ivs
    base = statistics.mean(seconds["none"])
    res = {
        "none": {"seconds_per_step": base, "ratio": 1.0, "none_spread": [min(seconds["none"]), max(seconds["none"])]}
    }
    for a in arms:
        res[a] = {"seconds_per_step": seconds[a][0], "ratio": seconds[a][0] / base,
                  "ratio_min": seconds[a][0] / max(seconds["none"]), "ratio_max": seconds[a][0] / min(seconds["none"])}  # fmt: skip
    res["none"].update(ratio_min=min(seconds["none"]) / base, ratio_max=max(seconds["none"]) / base)
    return res


# ---------------------------------------------------------------------- the table
def _fmt(entry: dict[str, Any] | None, pct: bool = False, digits: int = 2) -> str:
    if not entry or entry.get("mean") is None or (isinstance(entry["mean"], float) and math.isnan(entry["mean"])):
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.{digits}f}")
    s = f(entry["mean"]) + (f" ± {f(entry['std'])}" if entry.get("std") is not None else "")
    return s


def _paired(entry: dict[str, Any] | None, pct: bool = True, digits: int = 3) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:+.{digits}f}")
    text = f(entry["mean"])
    if entry.get("ci"):
        text += f" [{f(entry['ci'][0])}, {f(entry['ci'][1])}]"
    if entry.get("p_signflip") is not None:
        text += f" p={entry['p_signflip']:.2g}/{entry['p_t']:.2g}"
    return text


def setting_rows(name: str, out: Path, config: ExperimentConfig, costs: dict[str, Any] | None) -> list[dict[str, Any]]:
    s = _summary(out)
    pl = per_layer_final(out, config)
    rows = []
    aligned_harm = s["history"]["aligned"].get("harmful_rate", {}).get("mean")
    none_harm = s["outcomes"].get("none", {}).get("harmful_rate", {}).get("mean")
    for arm in config.arms:
        o = s["outcomes"][arm]
        sel = pl[pl.arm == arm].sort_values("layer")
        harm = o.get("harmful_rate", {}).get("mean")
        explained = None
        if arm != "none" and None not in (harm, none_harm, aligned_harm) and none_harm - aligned_harm > 1e-9:
            explained = (none_harm - harm) / (none_harm - aligned_harm)
        rows.append({
            "setting": name, "arm": arm, "n_seeds": len(config.seeds),
            "final_cos_per_layer": [round(float(c), 3) for c in sel.cos],
            "max_final_cos": float(sel.cos.max()), "p99": float(sel.p99.iloc[0]),
            "holds": bool((sel.cos <= sel.p99).all()), "share_above_p99": float((sel.share_above * 1).mean()),
            "harm": o.get("harmful_rate"), "harm_minus_none": o.get("harmful_rate_minus_none"),
            "harm_increase_removed": explained, "over_refusal": o.get("over_refusal_rate"),
            "task_loss": o.get("task_loss"), "task_loss_minus_none": o.get("task_loss_minus_none"),
            "task_kl": o.get("task_kl"), "cost": (costs or {}).get(arm),
        })  # fmt: skip
    return rows


def verdict(all_rows: list[dict[str, Any]]) -> list[str]:
    """Across settings: per arm, whether it holds (max over layers of the mean final cos vs the p99) and its harm cut."""
    names = list(dict.fromkeys(r["setting"] for r in all_rows))
    arms = list(dict.fromkeys(r["arm"] for r in all_rows if r["arm"] != "none"))
    by = {(r["setting"], r["arm"]): r for r in all_rows}
    lines = ["## Which block holds geometrically, and does it cut harm", "",
             "Per setting: *holds* when no layer's mean final cos(drift, v_rev) exceeds the isotropic p99 (max over "
             "layers in brackets); then the paired harm difference against `none` in points [95% CI].", "",
             "| arm | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]  # fmt: skip
    for arm in arms:
        cells = []
        for n in names:
            r = by.get((n, arm))
            if r is None:
                cells.append("–")
                continue
            cells.append(
                f"{'holds' if r['holds'] else 'no'} ({r['max_final_cos']:.2f}); {_paired(r['harm_minus_none'])}"
            )
        lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    everywhere = [a for a in arms if all(by.get((n, a), {}).get("holds") for n in names)]
    lines += ["", f"Holding in every setting listed: {', '.join(f'`{a}`' for a in everywhere) or 'none'}.", ""]
    return lines


def markdown(all_rows: list[dict[str, Any]], extras: dict[str, Any]) -> str:
    lines = ["# Block semantics side by side", "", *verdict(all_rows)]
    for name in dict.fromkeys(r["setting"] for r in all_rows):
        rows = [r for r in all_rows if r["setting"] == name]
        ex = extras.get(name, {})
        lines += [f"## {name} ({rows[0]['n_seeds']} seeds; {ex.get('describe', '')})", "",
                  f"harm after alignment {ex.get('aligned_harm', 'n/a')}; isotropic p99 of cos {rows[0]['p99']:.3f}.", "",
                  "| arm | final cos per layer (mean over seeds) | holds | harm % | Δ harm vs none, pts [95% CI] p sign-flip/t "
                  "| share of increase removed | over-refusal % | task loss | Δ task loss | step cost × none |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in rows:
            cost = r["cost"]
            cost_s = f"{cost['ratio']:.2f} [{cost['ratio_min']:.2f}-{cost['ratio_max']:.2f}]" if cost else "n/a"
            expl = "n/a" if r["harm_increase_removed"] is None else f"{100 * r['harm_increase_removed']:.0f}%"
            lines.append(
                f"| `{r['arm']}` | {' '.join(f'{c:.2f}' for c in r['final_cos_per_layer'])} | {'yes' if r['holds'] else 'no'} "
                f"| {_fmt(r['harm'], pct=True)} | {_paired(r['harm_minus_none'])} | {expl} | {_fmt(r['over_refusal'], pct=True)} "
                f"| {_fmt(r['task_loss'], digits=4)} | {_paired(r['task_loss_minus_none'], pct=False, digits=4)} | {cost_s} |"
            )  # fmt: skip
        sub = ex.get("subspace")
        if sub is not None and len(sub):
            lines += ["", "Drift inside the k-dimensional v_rev at step T (mean over layers and seeds): alignment "
                      "||P_S d||/||d|| [isotropic p99], energy share (isotropic mean k/d):", "",
                      "| arm | " + " | ".join(f"k={k}" for k in sorted(sub.k.unique())) + " |",
                      "| --- | " + " | ".join("---" for _ in sub.k.unique()) + " |"]  # fmt: skip
            for arm, g in sub.groupby("arm", sort=False):
                cells = []
                for _, gk in g.groupby("k"):
                    cells.append(f"{gk.alignment.mean():.2f} [{gk.null_p99.iloc[0]:.2f}], {gk.energy_share.mean():.2f}")
                lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
        probe = ex.get("clamp_probe")
        if probe is not None and len(probe):
            lines += ["", "Is v_rev where the behaviour lives? Harm with an inference-time per-input `clamp` of v_rev at every "
                      "layer and position (mean over seeds): the aligned model clamped to the base model's components "
                      "(sufficiency), fine-tuned models clamped to the aligned model's (necessity):", "",
                      "| model | clamped to | harm bare % | harm clamped % |", "| --- | --- | --- | --- |"]  # fmt: skip
            for (model, to), g in probe.groupby(["model", "clamped_to"], sort=False):
                lines.append(
                    f"| `{model}` | {to} | {100 * g.harm_bare.mean():.1f} | {100 * g.harm_clamped.mean():.1f} |"
                )
        split = ex.get("split")
        if split is not None and len(split):
            lines += ["", "Motion of the probe mean along v_l at layer l, step T, split into writer and reader parts "
                      "(mean over seeds; per layer writer / reader):", "",
                      "| arm | " + " | ".join(f"layer {l}" for l in sorted(split.layer.unique())) + " | max |residual| |",
                      "| --- | " + " | ".join("---" for _ in split.layer.unique()) + " | --- |"]  # fmt: skip
            for arm, g in split.groupby("arm", sort=False):
                m = g.groupby("layer")[["motion", "writer", "reader"]].mean()
                cells = [f"{row.writer:+.2f} / {row.reader:+.2f}" for row in m.itertuples()]
                lines.append(f"| `{arm}` | " + " | ".join(cells) + f" | {g.residual.abs().max():.1e} |")
        lines.append("")
    return "\n".join(lines)


def figures(all_rows: list[dict[str, Any]], folder: Path, formats: tuple[str, ...]) -> list[Path]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    folder.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(r["setting"] for r in all_rows))
    color = lambda arm: MODES[Arm.parse(arm).mode].meta.get("color", "#444") if Arm.parse(arm).mode else "#7f7f7f"
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    for c, name in enumerate(names, 1):
        rows = [r for r in all_rows if r["setting"] == name]
        for r in rows:
            dash = "dot" if "random" in r["arm"] or Arm.parse(r["arm"]).k > 1 else "solid"
            fig.add_trace(go.Scatter(x=list(range(len(r["final_cos_per_layer"]))), y=r["final_cos_per_layer"],
                                     mode="lines+markers", name=r["arm"], legendgroup=r["arm"], showlegend=c == 1,
                                     line={"color": color(r["arm"]), "dash": dash}), row=1, col=c)  # fmt: skip
        n = len(rows[0]["final_cos_per_layer"])
        fig.add_trace(go.Scatter(x=[0, n - 1], y=[rows[0]["p99"]] * 2, mode="lines", name="isotropic p99",
                                 legendgroup="p99", showlegend=c == 1, line={"color": "black", "dash": "dash"}), row=1, col=c)  # fmt: skip
        fig.update_xaxes(title_text="layer", row=1, col=c)
    fig.update_yaxes(title_text="final cos(drift, v_rev), mean over seeds", row=1, col=1)
    fig.update_layout(title="Per-layer final alignment per block mode (dotted: k-dim v_rev or random)", height=620,
                      width=380 * len(names) + 260)  # fmt: skip
    fig2 = make_subplots(rows=1, cols=len(names), subplot_titles=names)
    for c, name in enumerate(names, 1):
        for r in (r for r in all_rows if r["setting"] == name):
            if not r["harm"] or r["harm"].get("mean") is None or not r["task_loss"]:
                continue
            fig2.add_trace(go.Scatter(x=[r["task_loss"]["mean"]], y=[100 * r["harm"]["mean"]], mode="markers",
                                      name=r["arm"], legendgroup=r["arm"],
                                      showlegend=c == 1, marker={"color": color(r["arm"]), "size": 10,
                                      "symbol": ("circle" if r["holds"] else "x")
                                      + ("-open" if Arm.parse(r["arm"]).k > 1 or "random" in r["arm"] else "")},
                                      error_y={"type": "data", "array": [100 * (r["harm"].get("std") or 0)]}),
                           row=1, col=c)  # fmt: skip
        fig2.update_xaxes(title_text="task loss at step T (nats/token, log)", type="log", row=1, col=c)
    fig2.update_yaxes(title_text="harm rate at step T, % (± sd over seeds)", row=1, col=1)
    fig2.update_layout(title="Harm against task cost (circle: the block holds geometrically, x: it does not; "
                       "open: k-dim v_rev or random)",
                       height=620, width=420 * len(names) + 260)  # fmt: skip
    written = []
    for fig_, stem in ((fig, "per_layer_final_alignment"), (fig2, "harm_vs_task_cost")):
        for fmt in formats:
            path = folder / f"{stem}.{fmt}"
            fig_.write_html(path, include_plotlyjs="cdn") if fmt == "html" else fig_.write_image(path, scale=2)
            written.append(path)
    return written


# ---------------------------------------------------------------------- main
def _configs(args: argparse.Namespace) -> dict[str, ExperimentConfig]:
    out = {}
    for name in args.settings.split(","):
        if name == "hf":
            if not args.hf_config:
                raise SystemExit("--settings hf needs --hf-config (an hf experiment TOML).")
            arms = tuple(args.hf_arms.split(",")) if args.hf_arms else HF_ARMS
            out[name] = hf_config(Path(args.hf_config), arms, args.seeds, args.steps, args.workers)
        else:
            out[name] = toy_config(name, args.seeds, args.steps, args.workers)
            if args.extra:
                out[f"{name}-extra"] = toy_config(name, args.seeds, args.steps, args.workers, extra=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("run", "report", "all"))
    ap.add_argument("--settings", default="default,paper,layers8")
    ap.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: per setting)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default: toy 100, hf the config's)")
    ap.add_argument("--hf-config", help="an hf experiment TOML (setting = 'hf') for --settings hf")
    ap.add_argument("--hf-arms", help=f"comma-separated arms for hf (default {','.join(HF_ARMS)})")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reuse", action="append", help="another results folder whose prepared seeds (same history) "
                    "may be shared, e.g. the folder analyses/smollm2_reversion.py wrote (repeatable)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("results/block_semantics"))
    ap.add_argument("--format", choices=("html", "png", "both", "none"), default="both")
    ap.add_argument("--no-costs", action="store_true", help="skip the step-cost measurement")
    ap.add_argument("--extra", action="store_true", help=f"also the arms {EXTRA_ARMS} in <setting>-extra folders")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    configs = _configs(args)
    t0 = time.perf_counter()
    if args.what in ("run", "all"):
        for name, config in configs.items():
            if args.extra and not name.endswith("-extra"):
                continue  # the setting's own arms ran before; only the extra arms now
            print(f"== {name}: {len(config.seeds)} seeds x {len(config.arms)} arms", flush=True)
            main_folder = args.out / name.removesuffix("-extra")
            reuse = ((main_folder,) if name.endswith("-extra") else ()) + tuple(args.reuse or ())
            run_experiment(config, args.out / name, reuse=reuse)
            print(f"== {name} done ({time.perf_counter() - t0:.0f} s wall)", flush=True)
    if args.what in ("report", "all"):
        all_rows, extras = [], {}
        for name, config in configs.items():
            out = args.out / name
            if not (out / "summary.json").exists():
                print(f"(skipping {name}: no summary.json in {out})")
                continue
            config = ExperimentConfig.from_dict(read_json(out / "config.json")["config"])
            costs = None
            if not args.no_costs and not (out / "step_costs.json").exists():
                costs = step_costs(config, out) if config.setting == "toy" else sequential_step_costs(config, out)
                (out / "step_costs.json").write_text(json.dumps(costs, indent=2))
            elif (out / "step_costs.json").exists():
                costs = json.loads((out / "step_costs.json").read_text())
            s = _summary(out)
            ah = s["history"]["aligned"].get("harmful_rate")
            tables = {"subspace": subspace_table(out, config)}
            if config.setting == "toy":
                tables["split"] = split_table(out, config)
                if not name.endswith("-extra"):
                    tables["clamp_probe"] = clamp_probe_table(out, config)
            rows = setting_rows(name, out, config, costs)
            target = name.removesuffix("-extra")
            if target != name and target in extras:  # the extra arms join their setting's table
                main_none = next(r for r in all_rows if r["setting"] == target and r["arm"] == "none")
                here_none = next(r for r in rows if r["arm"] == "none")
                if main_none["harm"] != here_none["harm"]:
                    print(
                        f"warning: `none` differs between {target} and {name}; their paired differences are within {name}"
                    )
                rows = [{**r, "setting": target} for r in rows if r["arm"] != "none"]
                for key, table in tables.items():
                    keep = table[table.arm != "none"] if len(table) else table
                    extras[target][key] = pd.concat([extras[target].get(key, pd.DataFrame()), keep], ignore_index=True)
            else:
                extras[name] = {"describe": json.dumps(config.params), **tables,
                                "aligned_harm": _fmt(ah, pct=True) + "%" if ah else "n/a"}  # fmt: skip
            all_rows += rows
            print(f"report: {name} read ({time.perf_counter() - t0:.0f} s wall)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "block_semantics.md").write_text(markdown(all_rows, extras))
        flat = [{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in all_rows]
        pd.DataFrame(flat).to_csv(args.out / "block_semantics.csv", index=False)
        for name, ex in extras.items():
            for key in ("subspace", "split", "clamp_probe"):  # the setting's tables, its extra arms included
                if isinstance(ex.get(key), pd.DataFrame) and len(ex[key]):
                    ex[key].to_csv(args.out / name / f"{key}.csv", index=False)
        if args.format != "none" and all_rows:
            formats = ("html", "png") if args.format == "both" else (args.format,)
            for p in figures(all_rows, args.out / "figures", formats):
                print(f"figure -> {p}")
        print(f"-> {args.out / 'block_semantics.md'}")
    print(f"block_semantics: {time.perf_counter() - t0:.0f} s wall")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
