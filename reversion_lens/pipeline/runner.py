"""The runner: seeds x arms x steps of any setting, resumable, into one results folder.

Two kinds of task, both top-level functions of picklable arguments (any executor can run them: local
processes, Ray) and both idempotent: a finished seed or run is never recomputed.

* **seed** (:func:`prepare_seed`): the seed's history, probe statistics of every checkpoint, v_rev (the
  config's estimator), the nulls (every registered null model), the vocabulary readout, and the
  evaluations of ``base`` and ``aligned``. Seeds whose setting reports the same ``history_id`` (a
  Hugging Face history is the same for every seed) compute these once; the others link the files.
* **run** (:func:`run_arm`): fine-tune the aligned model in one arm (interventions built from the mode
  registry, given what each mode declares it needs), tracking the drift at ``track_steps`` and evaluating
  at ``eval_steps``; each logged step is written as it is measured, the resumable state every few steps
  (``checkpoint_every``), and ``done.json`` last.

:func:`run_experiment` queues every seed's preparation first, then the runs seed by seed, then aggregates
(:mod:`reversion_lens.pipeline.results`). The runner knows settings only through
:mod:`reversion_lens.pipeline.setting`.
"""

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..activations import ResidStats
from ..directions import Direction, random_subspace, reversion_subspace, vocab_readout
from ..hooks import eval_mode
from ..interventions import block, random_control
from ..io import (
    FileLock,
    atomic_write_text,
    load_tensors,
    read_json,
    save_tensors,
    torch_threads,
    write_csv,
    write_json,
)
from ..nulls import NullContext, null_quantiles
from ..registry import ESTIMATORS, MODES
from ..tracking import DriftTracker
from ..training import finetune
from .arms import Arm
from .config import ExperimentConfig
from .executors import Executor, LocalExecutor, Progress, report
from .layout import lock_for, null_column, record_config, run_dir, seed_dir, trajectory_columns
from .setting import METRICS, SeedHistory, make_setting

__all__ = ["Task", "run_experiment", "run_task", "prepare_seed", "run_arm", "build_interventions", "weight_cosine"]


@dataclass(frozen=True)
class Task:
    """One unit of work: a seed's preparation (``kind="seed"``) or one (seed, arm) run (``kind="run"``)."""

    kind: str
    config: ExperimentConfig
    seed: int
    out: str
    arm: str | None = None
    num_gpus: float = 0.0  # asked of a Ray cluster per task (1 when the setting runs on CUDA)
    reuse: tuple[str, ...] = ()  # other results folders whose seeds' history files may be shared

    @property
    def counts(self) -> bool:
        """Whether progress counts this task (the runs; seed preparations are shown, not counted)."""
        return self.kind == "run"

    def __str__(self) -> str:
        return f"seed {self.seed} {self.arm}" if self.kind == "run" else f"seed {self.seed} (history)"


def run_task(task: Task) -> Any:
    if task.kind == "seed":
        return prepare_seed(task.config, task.seed, task.out, task.reuse)
    if task.kind == "run":
        return run_arm(task.config, task.seed, task.arm, task.out, task.reuse)
    raise ValueError(f"unknown task kind {task.kind!r}; use 'seed' or 'run'.")


# ---------------------------------------------------------------------- seeds
def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy where links are not possible), replacing ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _twin(out: Path, seed: int, history_id: str, reuse: tuple[str, ...]) -> Path | None:
    """A finished seed folder (here or in a ``reuse`` folder) with the same history, whose files this seed can share."""
    for root in (out, *map(Path, reuse)):
        for path in sorted((root / "runs").glob("seed*/seed.json")):
            if path.parent == seed_dir(out, seed):
                continue
            if read_json(path).get("history_id") == history_id:
                return path.parent
    return None


def _write_responses(path: Path, responses: list[dict[str, Any]] | None) -> None:
    if responses:
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in responses))


def _evaluate(hist: SeedHistory, model: Any) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """The setting's evaluation (eval mode), split into metrics and the responses to write."""
    with eval_mode(model):
        ev = dict(hist.evaluate(model))
    return ev, ev.pop("responses", None)


def prepare_seed(
    config: ExperimentConfig, seed: int, out: str | os.PathLike, reuse: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Build (or load) the seed's history; write its statistics, v_rev, nulls, readout and evaluations.

    A finished seed with the same ``history_id`` (in ``out`` or a ``reuse`` folder) shares its statistics
    and readout (hard links), and its evaluations when its ``evaluation_id`` is the same too."""
    out = Path(out)
    folder = seed_dir(out, seed)
    done = folder / "seed.json"
    if done.exists():
        return read_json(done)
    folder.mkdir(parents=True, exist_ok=True)
    with lock_for(folder), torch_threads(config.threads_per_worker):
        if done.exists():
            return read_json(done)
        setting = make_setting(config)
        hid = setting.history_id(seed)
        eid = setting.evaluation_id(seed) if hasattr(setting, "evaluation_id") else hid
        report(f"seed {seed}: history")
        hist = setting.history(seed)
        names = [c.name for c in hist.history]
        with FileLock(out / "runs" / f".history-{hid}.lock"):  # seeds sharing a history prepare it once
            twin = _twin(out, seed, hid, reuse)
            if twin is not None:
                for f in (*twin.glob("history/*.safetensors"), twin / "vocab.csv"):
                    if f.exists():
                        _link(f, folder / f.relative_to(twin))
                twin_info = read_json(twin / "seed.json")
                if twin_info.get("evaluation_id") == eid:
                    for f in twin.glob("responses/*.jsonl"):
                        _link(f, folder / f.relative_to(twin))
                    evals = twin_info["evals"]
                else:
                    evals = _evaluate_history(hist, folder)
            else:
                _history_stats(config, setting, hist, names, folder)
                evals = _evaluate_history(hist, folder)
        stats = {n: ResidStats.load(folder / "history" / f"{n}.safetensors") for n in names}
        estimator = ESTIMATORS[config.direction]
        v = estimator.obj(stats["base"], stats["aligned"])
        v.save(folder / "direction.safetensors")
        nulls = null_quantiles(NullContext(v, stats["aligned"], seed=seed, draws=config.null_draws))
        info = {
            "seed": seed,
            "history_id": hid,
            "evaluation_id": eid,
            "checkpoints": names,
            "layers": list(v.layers),
            "d_model": v.d_model,
            "nulls": nulls,
            "direction_norms": v.norms.tolist(),
            "evals": evals,
            "history": hist.meta,
        }
        write_json(done, info)  # last: the seed's marker
        return info


def _history_stats(config: ExperimentConfig, setting: Any, hist: SeedHistory, names: list[str], folder: Path) -> None:
    """Probe statistics of every checkpoint (second moments for the aligned one: the matched null), and the
    vocabulary readout of v_rev through the aligned model."""
    probes = hist.probes()
    estimator = ESTIMATORS[config.direction]
    batch = setting.probe_batch_size or len(probes)
    # [BLOCKS] subspace arms (v_rev<k>) need the per-prompt displacements
    per_prompt = bool(estimator.meta.get("per_prompt")) or any(Arm.parse(a).k > 1 for a in config.arms)
    for name in names:
        report(f"seed statistics: {name}")
        st = hist.history.stats(probes, [name], site=config.site, second_moments=name == "aligned",
                                keep_per_prompt=per_prompt, batch_size=batch)[name]  # fmt: skip
        st.save(folder / "history" / f"{name}.safetensors")
    if hist.tokenizer is not None:
        stats = {n: ResidStats.load(folder / "history" / f"{n}.safetensors") for n in ("base", "aligned")}
        readout = vocab_readout(estimator.obj(stats["base"], stats["aligned"]), hist.load("aligned"), k=8,
                                tokenizer=hist.tokenizer)  # fmt: skip
        write_csv(folder / "vocab.csv", readout.to_dict("records"), list(readout.columns))


def _evaluate_history(hist: SeedHistory, folder: Path) -> dict[str, Any]:
    """The evaluations of ``base`` and ``aligned`` (responses to ``folder/responses/<name>.jsonl``)."""
    evals = {}
    for name in ("base", "aligned"):
        report(f"seed evaluation: {name}")
        model = hist.load(name)
        evals[name], responses = _evaluate(hist, model)
        _write_responses(folder / "responses" / f"{name}.jsonl", responses)
        del model
    return evals


# ---------------------------------------------------------------------- runs
def weight_cosine(theta: torch.Tensor, aligned: torch.Tensor, base: torch.Tensor) -> float:
    """cos(theta_t - theta_aligned, theta_base - theta_aligned): reversion in weight space."""
    a, b = theta - aligned, base - aligned
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def _flat_params(model: Any) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])


def build_interventions(arm: Arm, model: Any, v: Direction, stats: dict[str, ResidStats], hist: SeedHistory,
                        config: ExperimentConfig, seed: int, probe_batch_size: int | None = None) -> list[Any]:  # fmt: skip
    """The arm's interventions on ``model``, each given what its mode declares it needs."""
    if arm.mode is None:
        return []
    direction: Any = v if arm.direction == "v_rev" else random_control(v, seed=seed + config.random_seed_offset)
    if arm.k > 1:  # [BLOCKS] a k-dimensional v_rev (its leading row is the mean difference) or its random control
        if arm.direction == "v_rev":
            direction = reversion_subspace(stats["base"], stats["aligned"], arm.k)
        else:
            rseed = seed + config.random_seed_offset
            direction = random_subspace(v.d_model, v.layers, arm.k, rseed, site=v.site, like=v)
    providers = {
        "reference_model": lambda: hist.load("aligned"),  # a separate, frozen copy: never trained
        "probes": hist.probes,
        "reference": lambda: stats["aligned"],
        "base": lambda: stats["base"],
        "weight": lambda: config.penalty_weight,
        "batch_size": lambda: probe_batch_size,
    }
    needs = MODES[arm.mode].meta.get("needs", ())
    unknown = [n for n in needs if n not in providers]
    if unknown:
        raise ValueError(f"mode {arm.mode!r} needs {unknown}, which the runner cannot provide ({sorted(providers)}).")
    return [block(model, direction, arm.mode, layers=arm.layers, **{n: providers[n]() for n in needs})]


def run_arm(config: ExperimentConfig, seed: int, arm_name: str, out: str | os.PathLike,
            reuse: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """Fine-tune the aligned model of ``seed`` in ``arm``, tracking drift and evaluating; resumable."""
    out = Path(out)
    folder = run_dir(out, seed, arm_name)
    if (folder / "done.json").exists():
        return folder
    prepare_seed(config, seed, out, reuse)
    folder.mkdir(parents=True, exist_ok=True)
    with lock_for(folder), torch_threads(config.threads_per_worker):
        if (folder / "done.json").exists():
            return folder
        arm = Arm.parse(arm_name)
        label = f"seed {seed} {arm_name}"
        report(f"{label}: loading")
        torch.manual_seed(seed)
        setting = make_setting(config)
        hist = setting.history(seed)
        sdir = seed_dir(out, seed)
        info = read_json(sdir / "seed.json")
        v = Direction.load(sdir / "direction.safetensors")
        stats = {n: ResidStats.load(sdir / "history" / f"{n}.safetensors") for n in ("base", "aligned")}
        probes = hist.probes()
        model = hist.load("aligned")
        prepare = getattr(hist, "prepare_finetune", None)  # e.g. LoRA adapters (the setting's choice)
        if prepare is not None:
            model = prepare(model)
        thetas = (_flat_params(model), _flat_params(hist.load("base"))) if setting.track_weights else None
        steps_dir = folder / "steps"
        tracker = DriftTracker(probes, v, reference=stats["aligned"], base=stats["base"], site=config.site,
                               keep_means=True, batch_size=setting.probe_batch_size or len(probes))  # fmt: skip

        def measure(step: int, m: Any) -> None:
            out_json = steps_dir / f"step_{step}.json"
            if out_json.exists():  # measured before an interruption; deterministic, so keep it
                return
            report(f"{label}: measuring step {step}")
            rec: dict[str, Any] = {"step": step}
            if thetas is not None:
                rec["weight_cos"] = weight_cosine(_flat_params(m), *thetas)
            if step in config.track_steps and step > 0:
                rec["rows"] = tracker.measure(step, m)
                save_tensors(steps_dir / f"step_{step}.safetensors", {"mean": tracker.means[step]})
            # the aligned model: evaluated once per seed already ([BLOCKS] unless an intervention edited the weights)
            if step in config.eval_steps and step == 0 and not any(getattr(iv, "edits_weights", False) for iv in ivs):
                rec["eval"] = info["evals"]["aligned"]
                if (sdir / "responses" / "aligned.jsonl").exists():
                    _link(sdir / "responses" / "aligned.jsonl", folder / "responses" / "step_0.jsonl")
            elif step in config.eval_steps:
                # finetune calls back with every intervention paused: this evaluates the bare fine-tuned
                # weights, the model a user would deploy, in every arm (a clamp included).
                rec["eval"], responses = _evaluate(hist, m)
                _write_responses(folder / "responses" / f"step_{step}.jsonl", responses)
                if config.save_model == "evaluated":
                    hist.save_model(m, folder / f"model_step{step}")
            write_json(out_json, rec)

        log_steps = sorted(set(config.track_steps) | set(config.eval_steps))
        optim = hist.finetune_optim(**({"lr": config.finetune_lr} if config.finetune_lr else {}))
        data = hist.finetune_data(arm.data, seed=seed)
        ivs = build_interventions(arm, model, v, stats, hist, config, seed, setting.probe_batch_size)
        losses = finetune(
            model, data, config.steps, optim=optim, interventions=ivs, callbacks=[measure],
            callback_steps=log_steps, state_dir=folder / "state", save_every=config.checkpoint_every or "auto",
            keep_state=config.keep_state, progress=False,
            on_step=lambda s: report(f"{label}: step {s}/{config.steps}"),
        )  # fmt: skip
        if config.save_model == "final":
            hist.save_model(model, folder / "model")
        _finish(folder, config, seed, arm, info, log_steps, losses, optim)
        return folder


def _finish(folder: Path, config: ExperimentConfig, seed: int, arm: Arm, info: dict[str, Any],
            log_steps: list[int], losses: list[float], optim: Any) -> None:  # fmt: skip
    steps_dir = folder / "steps"
    rows, evals, means = [], {}, {}
    layers = info["layers"]
    for step in log_steps:
        rec = read_json(steps_dir / f"step_{step}.json")
        ev = rec.get("eval", {})
        if ev:
            evals[str(step)] = ev
        track = {r["layer"]: r for r in rec.get("rows", [])}
        if step in config.track_steps and step > 0:
            means[f"step_{step}"] = load_tensors(steps_dir / f"step_{step}.safetensors")[0]["mean"]
        for i, layer in enumerate(layers):
            r = track.get(layer, {})
            row = {
                "seed": seed,
                "arm": arm.name,
                "step": step,
                "layer": layer,
                **r,
                "weight_cos": rec.get("weight_cos"),
            }
            row.update({null_column(name): p99[i] for name, p99 in info["nulls"].items()})
            row.update({k: ev.get(k) for k in METRICS})
            rows.append(row)
    evals.setdefault("0", info["evals"]["aligned"])  # step 0 is the aligned model, evaluated with the seed
    save_tensors(folder / "means.safetensors", means, {"layers": layers, "site": config.site})
    write_csv(folder / "trajectory.csv", rows, trajectory_columns())
    write_json(folder / "evals.json", evals)
    write_json(folder / "done.json", {"seed": seed, "arm": arm.name, "losses": list(losses), "optim": optim.to_dict(),
                                      "steps": config.steps})  # fmt: skip
    shutil.rmtree(folder / "state", ignore_errors=True)


# ---------------------------------------------------------------------- the experiment
def run_experiment(
    config: ExperimentConfig,
    out: str | os.PathLike,
    executor: Executor | None = None,
    progress: bool = True,
    log: Any = print,
    reuse: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Run (or resume) every seed x arm of ``config`` into ``out`` and aggregate. Returns ``out``.

    Args:
        config: the experiment (any setting).
        out: the results folder (created; a folder holding another config is refused).
        executor: where tasks run (default: :class:`LocalExecutor` with ``config.workers`` processes).
        progress: show progress (a bar on a terminal, a line per finished run elsewhere).
        log: where progress lines go (``None``: nowhere).
        reuse: other results folders: a seed whose history another folder has prepared already (same
            ``history_id``) links its statistics instead of recomputing them.
    """
    from .results import aggregate

    out = Path(out).resolve()  # workers (other processes, other machines) must not depend on our cwd
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, cache_dir=str(config.resolved_cache_dir().resolve()))
    record_config(out, config)
    setting = make_setting(config)
    executor = executor or LocalExecutor(config.workers, config.threads_per_worker)
    say = log or (lambda s: None)
    gpus = 1.0 if str(setting.device).startswith("cuda") else 0.0
    # Every seed's preparation (history, v_rev, nulls: the long tasks) is queued first, then the runs seed by
    # seed. Workers take tasks in order, so a run starts only once its seed is ready or being prepared by
    # another worker, and the last seed to be prepared has its runs last: no worker waits on a seed's lock
    # while other work is queued. (Both kinds of task are idempotent and locked, so any order is correct.)
    reuse = tuple(str(Path(r).resolve()) for r in reuse)
    runs = [Task("run", config, s, str(out), a, gpus, reuse) for s in config.seeds for a in config.arms]
    todo = [t for t in runs if not (run_dir(out, t.seed, t.arm) / "done.json").exists()]
    seeds = [Task("seed", config, s, str(out), None, gpus, reuse) for s in dict.fromkeys(t.seed for t in todo)]
    seeds = [t for t in seeds if not (seed_dir(out, t.seed) / "seed.json").exists()]
    say(f"[1/2] {len(config.seeds)} seeds x {len(config.arms)} arms -> {out}: {len(todo)} of {len(runs)} runs to do "
        f"({len(runs) - len(todo)} already complete)")  # fmt: skip
    bar = Progress(len(todo), log=say) if progress else None
    try:
        executor.map(run_task, seeds + todo, bar)
    finally:
        if bar is not None:
            bar.close()
    say("[2/2] aggregating")
    aggregate(out, config)
    return out
