"""The toy-world side of the experiment runner: one function per seed, one per (seed, arm) run.

Both are top-level functions of picklable arguments so that any executor (local processes, Ray) can
run them, and both are idempotent: a completed seed or run is never recomputed.
"""

from pathlib import Path
from typing import Any

import torch

from ..activations import ResidStats
from ..directions import Direction, mean_difference, vocab_readout
from ..experiments import Arm, ExperimentConfig, lock_for, run_dir, seed_dir, write_rows_csv
from ..io import read_json, save_tensors, torch_threads, write_json
from ..stats import isotropic_quantile, matched_quantile
from .history import ToyConfig, ToyHistory, build_history

__all__ = ["toy_config", "load_history", "prepare_seed", "run_arm", "run_task", "TRAJECTORY_COLUMNS", "weight_cosine"]

TRAJECTORY_COLUMNS = (
    "seed", "arm", "step", "layer", "cos", "projection", "drift_norm", "reversion_ratio",
    "null_p99_isotropic", "null_p99_matched", "weight_cos", "harmful_rate", "harmful_correct_rate",
    "task_accuracy", "task_loss",
)  # fmt: skip


def toy_config(config: ExperimentConfig) -> ToyConfig:
    extra = dict(config.toy)
    if config.n_probes is not None:
        extra["n_probes"] = config.n_probes
    return ToyConfig.preset(config.preset, **extra)


def load_history(config: ExperimentConfig, seed: int) -> ToyHistory:
    return build_history(toy_config(config), seed, cache_dir=config.resolved_cache_dir() / "toyworld")


def _flat_params(model: Any) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def weight_cosine(theta: torch.Tensor, aligned: torch.Tensor, base: torch.Tensor) -> float:
    """cos(theta_t - theta_aligned, theta_base - theta_aligned): reversion in weight space."""
    a, b = theta - aligned, base - aligned
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def prepare_seed(task: tuple[ExperimentConfig, int, str]) -> dict[str, Any]:
    """Build (or load) the seed's history; write probe means, v_rev and the per-layer nulls."""
    config, seed, out = task
    folder = seed_dir(out, seed)
    done = folder / "seed.json"
    if done.exists():
        return read_json(done)
    folder.mkdir(parents=True, exist_ok=True)
    with lock_for(folder), torch_threads(config.threads_per_worker):
        if done.exists():
            return read_json(done)
        hist = load_history(config, seed)
        probes = hist.probes("harmful")
        st = hist.history.stats(probes, ["base", "aligned"], site=config.site, second_moments=True)
        base, aligned = st["base"], st["aligned"]
        v = mean_difference(base, aligned)
        for name, s in st.items():
            ResidStats(s.sum, s.count, s.layers, s.site, meta=s.meta).save(folder / "history" / f"{name}.safetensors")
        v.save(folder / "direction.safetensors")
        # nulls per layer: isotropic (exact) and matched to the aligned model's probe-activation covariance
        d = v.d_model
        iso = isotropic_quantile(0.99, d)
        matched = matched_quantile(aligned.covariance(), v.vectors.double(), q=0.99, n=config.null_draws, seed=seed)
        evals = {name: hist.evaluate(hist.load(name)) for name in ("base", "aligned")}
        readout = vocab_readout(v, hist.load("aligned"), k=8, tokenizer=hist.tokenizer)
        write_rows_csv(folder / "vocab.csv", readout.to_dict("records"), list(readout.columns))
        info = {
            "seed": seed,
            "layers": list(v.layers),
            "d_model": d,
            "null_p99_isotropic": [iso] * len(v.layers),
            "null_p99_matched": [float(x) for x in matched],
            "direction_norms": v.norms.tolist(),
            "evals": evals,
            "history": hist.meta,
        }
        write_json(done, info)
        return info


def run_task(task: tuple[str, tuple[Any, ...]]) -> Any:
    """``("seed", args)`` -> :func:`prepare_seed`, ``("run", args)`` -> :func:`run_arm`: one function, so
    one executor ``map`` can interleave both kinds of task."""
    kind, args = task
    if kind == "seed":
        return prepare_seed(args)  # type: ignore[arg-type]
    if kind == "run":
        return run_arm(args)  # type: ignore[arg-type]
    raise ValueError(f"unknown task kind {kind!r}; use 'seed' or 'run'.")


def _interventions(arm: Arm, model: Any, v: Direction, aligned: ResidStats, base: ResidStats, hist: ToyHistory,
                   config: ExperimentConfig, seed: int) -> list[Any]:  # fmt: skip
    from ..interventions import block, random_control

    if arm.mode is None:
        return []
    direction = v if arm.direction == "v_rev" else random_control(v, seed=seed + config.random_seed_offset)
    opts: dict[str, Any] = {}
    if arm.mode == "clamp":  # per input: a second, frozen copy of the aligned model, never trained
        opts["reference_model"] = hist.load("aligned")
    if arm.mode.startswith("penalty"):
        opts.update(probes=hist.probes("harmful"), reference=aligned, base=base, weight=config.penalty_weight,
                    sign=arm.mode.split("-")[1])  # fmt: skip
        mode = "penalty"
    else:
        mode = arm.mode
    return [block(model, direction, mode, layers=arm.layers, **opts)]


def run_arm(task: tuple[ExperimentConfig, int, str, str]) -> Path:
    """Fine-tune the aligned model of ``seed`` in ``arm``, tracking drift and evaluating; resumable."""
    from ..tracking import DriftTracker
    from ..training import eval_mode, finetune

    config, seed, arm_name, out = task
    folder = run_dir(out, seed, arm_name)
    if (folder / "done.json").exists():
        return folder
    prepare_seed((config, seed, out))
    folder.mkdir(parents=True, exist_ok=True)
    with lock_for(folder), torch_threads(config.threads_per_worker):
        if (folder / "done.json").exists():
            return folder
        arm = Arm.parse(arm_name)
        torch.manual_seed(seed)
        hist = load_history(config, seed)
        sdir = seed_dir(out, seed)
        info = read_json(sdir / "seed.json")
        v = Direction.load(sdir / "direction.safetensors")
        base = ResidStats.load(sdir / "history" / "base.safetensors")
        aligned = ResidStats.load(sdir / "history" / "aligned.safetensors")
        probes = hist.probes("harmful")
        model = hist.load("aligned")
        theta_aligned = _flat_params(model)
        theta_base = _flat_params(hist.load("base"))
        steps_dir = folder / "steps"
        tracker = DriftTracker(probes, v, reference=aligned, base=base, site=config.site, keep_means=True)

        def measure(step: int, m: Any) -> None:
            out_json = steps_dir / f"step_{step}.json"
            if out_json.exists():  # measured before an interruption; deterministic, so keep it
                return
            rec: dict[str, Any] = {"step": step, "weight_cos": weight_cosine(_flat_params(m), theta_aligned, theta_base)}
            if step in config.track_steps:
                rows = tracker.measure(step, m)
                rec["rows"] = rows
                save_tensors(steps_dir / f"step_{step}.safetensors", {"mean": tracker.means[step]})
            if step in config.eval_steps and step == 0:  # the aligned model: evaluated once per seed already
                rec["eval"] = info["evals"]["aligned"]
            elif step in config.eval_steps:
                # finetune calls back with every intervention paused: this evaluates the bare fine-tuned
                # weights, the model a user would deploy, in every arm (a clamp included).
                with eval_mode(m):
                    rec["eval"] = hist.evaluate(m)
            write_json(out_json, rec)

        log_steps = sorted(set(config.track_steps) | set(config.eval_steps))
        optim = hist.finetune_optim(**({"lr": config.finetune_lr} if config.finetune_lr else {}))
        data = hist.finetune_data(arm.data, seed=seed)
        ivs = _interventions(arm, model, v, aligned, base, hist, config, seed)
        losses = finetune(
            model, data, config.steps, optim=optim, interventions=ivs, callbacks=[measure],
            callback_steps=log_steps, state_dir=folder / "state", progress=False,
        )  # fmt: skip
        _finish(folder, config, seed, arm, info, log_steps, losses, optim)
        return folder


def _finish(folder: Path, config: ExperimentConfig, seed: int, arm: Arm, info: dict[str, Any],
            log_steps: list[int], losses: list[float], optim: Any) -> None:  # fmt: skip
    from ..io import load_tensors

    steps_dir = folder / "steps"
    rows, evals, means = [], {}, {}
    layers = info["layers"]
    for step in log_steps:
        rec = read_json(steps_dir / f"step_{step}.json")
        ev = rec.get("eval", {})
        if ev:
            evals[str(step)] = ev
        track = {r["layer"]: r for r in rec.get("rows", [])}
        if step in config.track_steps:
            means[f"step_{step}"] = load_tensors(steps_dir / f"step_{step}.safetensors")[0]["mean"]
        for i, layer in enumerate(layers):
            r = track.get(layer, {})
            rows.append({
                "seed": seed, "arm": arm.name, "step": step, "layer": layer,
                "cos": r.get("cos"), "projection": r.get("projection"), "drift_norm": r.get("drift_norm"),
                "reversion_ratio": r.get("reversion_ratio"),
                "null_p99_isotropic": info["null_p99_isotropic"][i], "null_p99_matched": info["null_p99_matched"][i],
                "weight_cos": rec.get("weight_cos"), **{k: ev.get(k) for k in
                ("harmful_rate", "harmful_correct_rate", "task_accuracy", "task_loss")},
            })  # fmt: skip
    if 0 in log_steps or 0 not in evals:
        evals.setdefault("0", info["evals"]["aligned"])
    save_tensors(folder / "means.safetensors", means, {"layers": layers, "site": config.site})
    write_rows_csv(folder / "trajectory.csv", rows, TRAJECTORY_COLUMNS)
    write_json(folder / "evals.json", evals)
    write_json(folder / "done.json", {"seed": seed, "arm": arm.name, "losses": losses, "optim": optim.to_dict(),
                                      "steps": config.steps})  # fmt: skip
    import shutil

    shutil.rmtree(folder / "state", ignore_errors=True)
