"""A small, seeded, resumable fine-tuning loop for TransformerLens models.

Data is any object with ``batch(step) -> Batch``: a deterministic function of the step, so every arm of
an experiment sees the same data in the same order (paired comparisons) and a resumed run sees exactly
what an uninterrupted one would have.

One step (:func:`train_step`): task loss, plus each intervention's ``extra_loss(model, step)``;
backward; gradient clipping; ``optimizer.step()``; each intervention's ``after_step(model, optimizer)``.
After the update of step ``s`` (1-based), the tracker runs if ``s`` is in ``track_steps``, then the
callbacks if ``s`` is in ``callback_steps``. The tracker and the callbacks measure the fine-tuned weights:
attached interventions are paused while they run.

With ``state_dir``, the loop writes a resumable state: the model weights, the optimizer state, the RNG
states, the interventions' state, the losses, the callback results and the tracker's records, written
atomically (safetensors + JSON, in a temporary folder renamed into place, then ``latest.json``); only the
latest is kept. When: every ``save_every`` steps, or with ``save_every="auto"`` (the default) whenever the
time trained since the last save reaches 19 times what a save costs (measured on each save, estimated
from the state's size before the first), so writing states costs at most ~5% of the run whatever the
model's size. When the run completes the folder is deleted, unless ``keep_state=True`` (then the final
state is kept and a rerun returns at once). Rerunning with the same arguments resumes from the last
state and ends bit-identical to an uninterrupted run on the same machine and thread count; different
arguments are refused (:class:`~reversion_lens.errors.ConfigError`).
"""

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .data import Batch, BatchSource, next_token_loss, shifted_labels
from .errors import ConfigError, NonFiniteError
from .hooks import active_interventions, eval_mode, kept_modes, paused
from .io import FileLock, environment, load_tensors, read_json, save_tensors, write_json

__all__ = [
    "Batch",
    "BatchSource",
    "OptimConfig",
    "FinetuneResult",
    "lm_loss",
    "next_token_loss",
    "shifted_labels",
    "make_optimizer",
    "lr_at",
    "tracking_steps",
    "train_step",
    "eval_mode",
    "finetune",
]


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings, recorded with every run."""

    optimizer: str = "adamw"  # "adamw" or "sgd"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    momentum: float = 0.0  # sgd only
    warmup_steps: int = 0
    schedule: str = "constant"  # "constant" or "cosine" (to 10% of lr at the last step)
    grad_clip: float | None = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; use 'adamw' or 'sgd'.")


def lr_at(cfg: OptimConfig, step: int, total: int) -> float:
    """Learning rate at 0-based ``step`` of ``total``: linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    return cfg.lr


def lm_loss(model: Any, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy over target tokens (``loss_mask``), padding ignored.

    (:func:`reversion_lens.data.next_token_loss` of the model's logits.)
    """
    device = next(model.parameters()).device
    return next_token_loss(model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device)), batch)


def tracking_steps(steps: int) -> tuple[int, ...]:
    """``0, 1, 2, 5, 10, 20, 50, 100, ...`` up to ``steps``, plus ``steps`` itself."""
    out, k = [0], 1
    while k < steps:
        out += [s for s in (k, 2 * k, 5 * k) if s < steps]
        k *= 10
    return tuple(sorted(set([*out, steps])))


def train_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    step: int = 0,
    loss_fn: Callable[[Any, Batch], Tensor] = lm_loss,
    interventions: Sequence[Any] = (),
    grad_clip: float | None = None,
) -> tuple[float, float]:
    """One update; returns ``(task loss, auxiliary loss)``. ``step`` is 0-based."""
    loss = loss_fn(model, batch)
    aux_terms = [a for iv in interventions if (a := _call(iv, "extra_loss", model, step)) is not None]
    total = loss + sum(aux_terms) if aux_terms else loss
    value = float(total.detach())
    if not math.isfinite(value):
        raise NonFiniteError(
            f"the loss is {value} at step {step + 1}; the run diverged. Lower the learning rate or check the data."
        )
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    for iv in interventions:
        _call(iv, "after_step", model, optimizer)
    aux = float(sum(a.detach() for a in aux_terms)) if aux_terms else 0.0
    return float(loss.detach()), aux


def _call(obj: Any, method: str, *args: Any) -> Any:
    fn = getattr(obj, method, None)
    return fn(*args) if fn is not None else None


class FinetuneResult(list):
    """The per-step task losses (a list, as ``finetune`` has always returned) and what the run recorded.

    Attributes:
        aux_losses: the interventions' auxiliary loss per step (0.0 when none).
        evals: rows ``{step, callback, **result}`` from callbacks that returned a dict.
        records: the tracker's rows (``[]`` without a tracker).
        config: the run's identity: steps, optimizer settings, seed, interventions, tracker, ...
        resumed_from: the checkpoint step this call resumed from (``None``: a fresh run).
    """

    def __init__(
        self,
        losses: Sequence[float],
        aux_losses: Sequence[float],
        evals: list[dict[str, Any]],
        records: list[dict[str, Any]],
        config: dict[str, Any],
        resumed_from: int | None,
    ):
        super().__init__(losses)
        self.aux_losses = list(aux_losses)
        self.evals = evals
        self.records = records
        self.config = config
        self.resumed_from = resumed_from

    @property
    def losses(self) -> list[float]:
        return list(self)


def _jsonable(obj: Any) -> Any:
    def default(o: Any) -> Any:
        if isinstance(o, (Tensor, np.ndarray)):
            return o.tolist()
        if hasattr(o, "item"):
            return o.item()
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        return str(o)

    return json.loads(json.dumps(obj, sort_keys=True, default=default))


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _describe(obj: Any) -> Any:
    d = getattr(obj, "describe", None)
    return d() if callable(d) else _name(obj)


def finetune(
    model: Any,
    data: BatchSource,
    steps: int,
    *,
    optim: OptimConfig = OptimConfig(),
    callbacks: Sequence[Callable[[int, Any], Any]] = (),
    callback_steps: Sequence[int] = (),
    loss_fn: Callable[[Any, Batch], Tensor] = lm_loss,
    progress: bool | None = None,
    desc: str = "fine-tuning",
    interventions: Sequence[Any] = (),
    tracker: Callable[[int, Any], Any] | None = None,
    track_steps: Sequence[int] | None = None,
    seed: int | None = None,
    state_dir: str | os.PathLike | None = None,
    save_every: int | str | None = "auto",
    keep_state: bool = False,
    run_info: Mapping[str, Any] | None = None,
    on_step: Callable[[int], Any] | None = None,
) -> FinetuneResult:
    """Train ``model`` for ``steps`` steps on ``data``; returns the loss per step (a :class:`FinetuneResult`).

    Args:
        model: a TransformerLens model, trained in place (left in train mode).
        data: ``data.batch(step)`` for 0-based steps.
        steps: number of optimizer steps.
        optim: optimizer settings (AdamW by default), recorded in ``result.config``.
        callbacks: called as ``cb(step, model)`` after the update of each step in ``callback_steps``
            (1-based; 0 = before training). A callback returning a dict has it recorded in ``result.evals``.
        loss_fn: the task loss ``loss_fn(model, batch)``.
        progress: a tqdm bar (``None``: only on a terminal).
        interventions: :mod:`reversion_lens.interventions` objects (or anything with ``extra_loss`` /
            ``after_step``). Detached ones are attached for the run and removed after it; interventions
            already attached to ``model`` (``with block(...)``) are used too and left attached.
        tracker: a :class:`~reversion_lens.tracking.DriftTracker` (or any ``tracker(step, model)``).
        track_steps: steps to track at (default :func:`tracking_steps`).
        seed: seeds torch, ``random`` and numpy at the start of a fresh run (``None``: leave them).
        state_dir: folder for the resumable state; a rerun with the same arguments resumes from it.
        save_every: write the state every this many steps; ``"auto"`` (default): often enough to lose
            little work, rarely enough to cost at most ~5% of the run (see the module docstring);
            ``None``: never (only with ``keep_state``, at the end).
        keep_state: keep the final state when the run completes (default: delete ``state_dir``).
        run_info: extra JSON identity (arm, seed labels, ...) recorded and checked on resume.
        on_step: called as ``on_step(step)`` after each update (1-based), e.g. to report progress.
    """
    from tqdm.auto import tqdm

    wanted_cb = {int(s) for s in callback_steps}
    wanted_track = (
        {int(s) for s in (tracking_steps(steps) if track_steps is None else track_steps)}
        if tracker is not None
        else set()
    )
    ivs = list(interventions)
    ivs += [iv for iv in active_interventions(model) if not any(iv is x for x in ivs)]
    config = _jsonable(
        {
            "steps": steps,
            "optim": optim.to_dict(),
            "seed": seed,
            "loss_fn": _name(loss_fn),
            "data": _describe(data),
            "interventions": [_describe(iv) for iv in ivs],
            "tracker": _describe(tracker) if tracker is not None else None,
            "track_steps": sorted(wanted_track),
            "callbacks": [_name(cb) for cb in callbacks],
            "callback_steps": sorted(wanted_cb),
            "run_info": dict(run_info or {}),
        }
    )
    if not (save_every is None or save_every == "auto" or (isinstance(save_every, int) and save_every >= 1)):
        raise ConfigError(f"save_every must be a positive number of steps, 'auto' or None, not {save_every!r}.")
    ckpt = _Checkpoints(Path(state_dir), config) if state_dir is not None else None
    policy = _SavePolicy(save_every)
    losses: list[float] = []
    aux_losses: list[float] = []
    evals: list[dict[str, Any]] = []

    def measure(step: int) -> None:
        if step not in wanted_track and step not in wanted_cb:
            return
        with paused(model), kept_modes(model):
            if step in wanted_track:
                tracker(step, model)
            if step in wanted_cb:
                for cb in callbacks:
                    out = cb(step, model)
                    if isinstance(out, Mapping):
                        evals.append(_jsonable({"step": step, "callback": _name(cb), **out}))

    with contextlib.ExitStack() as stack:
        if ckpt is not None:
            stack.enter_context(ckpt.open())
        for iv in ivs:
            if getattr(iv, "attached", True) is False:
                stack.enter_context(iv)
        model.train()
        opt = make_optimizer(model, optim)
        resumed = ckpt.load(model, opt, ivs, tracker) if ckpt is not None else None
        if resumed is None:
            step0 = 0
            if seed is not None:
                _seed_all(seed)
            measure(0)
        else:
            step0, losses, aux_losses, evals = resumed
        bar = tqdm(
            range(step0, steps),
            desc=desc,
            initial=step0,
            total=steps,
            leave=False,
            disable=None if progress is None else not progress,
        )
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(optim, step, steps)
            loss, aux = train_step(
                model, opt, data.batch(step), step=step, loss_fn=loss_fn, interventions=ivs, grad_clip=optim.grad_clip
            )
            losses.append(loss)
            aux_losses.append(aux)
            done = step + 1
            if on_step is not None:
                on_step(done)
            measure(done)
            if ckpt is not None and done < steps and policy.due(done, model, opt):
                with policy.timed():
                    ckpt.save(done, model, opt, ivs, tracker, losses, aux_losses, evals)
        bar.close()
        if ckpt is not None and keep_state and step0 < steps:
            ckpt.save(steps, model, opt, ivs, tracker, losses, aux_losses, evals)
    if ckpt is not None and not keep_state:
        shutil.rmtree(ckpt.root, ignore_errors=True)
    records = list(getattr(tracker, "records", [])) if tracker is not None else []
    return FinetuneResult(losses, aux_losses, evals, records, config, step0 if resumed is not None else None)


# ---------------------------------------------------------------------- checkpoints
class _SavePolicy:
    """When to write the resumable state: every ``every`` steps, or ``"auto"`` (<= ~5% overhead)."""

    RATIO = 19.0  # train this many times a save's cost between saves: saves take <= 1/(1+19) = 5% of the time
    BYTES_PER_SECOND = 2e8  # first estimate of a save's speed (safetensors + SHA-256), before one is measured

    def __init__(self, every: int | str | None):
        self.every = every
        self.cost: float | None = None  # seconds the last save took
        self.since = time.perf_counter()

    def due(self, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> bool:
        if self.every is None:
            return False
        if self.every != "auto":
            return step % int(self.every) == 0
        if self.cost is None:  # weights + optimizer moments, before any save was timed
            n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            n_bytes += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                           if isinstance(t, Tensor))  # fmt: skip
            self.cost = 0.02 + n_bytes / self.BYTES_PER_SECOND
        return time.perf_counter() - self.since >= self.RATIO * self.cost

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.since = time.perf_counter()
        self.cost = self.since - t0


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [py[0], list(py[1]), py[2]], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def _set_rng_state(tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = info["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = info["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, other = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            (tensors if isinstance(v, Tensor) else other)[f"{idx}.{k}"] = v
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "other": _jsonable(other)}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*tensors.items(), *info["other"].items()]:
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in info["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _model_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """``state_dict`` with tied tensors copied apart (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.detach().clone() if ptr in seen else v.detach()
        seen.add(ptr)
    return out


class _Resume(NamedTuple):
    step: int
    losses: list[float]
    aux_losses: list[float]
    evals: list[dict[str, Any]]


class _Checkpoints:
    """``state_dir/run.json`` (the run's identity), ``latest.json`` and one ``step_XXXXXXX/`` folder."""

    def __init__(self, root: Path, config: dict[str, Any]):
        self.root = root
        self.config = config

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """Hold the folder's lock; check (or record) the run's identity."""
        self.root.mkdir(parents=True, exist_ok=True)
        with _StateLock(self.root / ".lock"):
            run = self.root / "run.json"
            if run.exists():
                stored = read_json(run).get("config") or {}
                if stored != self.config:
                    diff = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
                    raise ConfigError(
                        f"{self.root} holds a run with different arguments (differs in: {', '.join(diff)}). Rerun "
                        "with the same arguments to resume it, or use a new state_dir (or delete this one) to start afresh."
                    )
            else:
                meta = {"config": self.config, "environment": environment(), "torch_threads": torch.get_num_threads()}
                write_json(run, meta)
            yield

    def load(self, model: Any, opt: torch.optim.Optimizer, ivs: Sequence[Any], tracker: Any) -> _Resume | None:
        latest = self.root / "latest.json"
        if not latest.exists():
            return None
        folder = self.root / read_json(latest)["folder"]
        info = read_json(folder / "trainer.json")
        weights, _ = load_tensors(folder / "model.safetensors")
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in weights.items()})
        opt_tensors, _ = load_tensors(folder / "optimizer.safetensors")
        _load_optimizer(opt, opt_tensors, info["optimizer"])
        extra, _ = load_tensors(folder / "extra.safetensors")
        for i, iv in enumerate(ivs):
            prefix = f"iv.{i}."
            part = {k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)}
            if hasattr(iv, "load_state_dict"):
                iv.load_state_dict(part)
        if tracker is not None and hasattr(tracker, "load_state_dict"):
            prefix = "tracker."
            tracker.load_state_dict(
                {k[len(prefix) :]: v for k, v in extra.items() if k.startswith(prefix)}, info["tracker"]
            )
        _set_rng_state(extra, info["rng"])
        return _Resume(int(info["step"]), info["losses"], info["aux_losses"], info["evals"])

    def save(
        self,
        step: int,
        model: Any,
        opt: torch.optim.Optimizer,
        ivs: Sequence[Any],
        tracker: Any,
        losses: list[float],
        aux_losses: list[float],
        evals: list[dict[str, Any]],
    ) -> None:
        opt_tensors, opt_info = _optimizer_state(opt)
        rng_tensors, rng_info = _rng_state()
        extra = dict(rng_tensors)
        for i, iv in enumerate(ivs):
            for k, v in (_call(iv, "state_dict") or {}).items():
                extra[f"iv.{i}.{k}"] = v
        tracker_info: dict[str, Any] = {}
        if tracker is not None and hasattr(tracker, "state_dict"):
            t_tensors, tracker_info = tracker.state_dict()
            extra.update({f"tracker.{k}": v for k, v in t_tensors.items()})
        info = {
            "step": step,
            "losses": losses,
            "aux_losses": aux_losses,
            "evals": evals,
            "optimizer": opt_info,
            "rng": rng_info,
            "tracker": _jsonable(tracker_info),
        }
        name = f"step_{step:07d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}.", dir=self.root))
        try:
            save_tensors(tmp / "model.safetensors", _model_state(model), {"kind": "finetune_weights", "step": step})
            save_tensors(tmp / "optimizer.safetensors", opt_tensors, {"kind": "finetune_optimizer"})
            save_tensors(tmp / "extra.safetensors", extra, {"kind": "finetune_extra"})
            write_json(tmp / "trainer.json", info)
            final = self.root / name
            if final.exists():  # a stale folder from a kill before latest.json moved on
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json(self.root / "latest.json", {"step": step, "folder": name})
        for old in [*self.root.glob("step_*"), *self.root.glob(".tmp-step_*")]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


class _StateLock(FileLock):
    """A non-blocking lock: a second process on the same ``state_dir`` gets a clear error."""

    def __init__(self, path: Path):
        super().__init__(path, blocking=False)

    def __enter__(self) -> "_StateLock":
        try:
            super().__enter__()
        except BlockingIOError:
            raise ConfigError(
                f"another process is running in {self.path.parent}; wait for it or use another state_dir."
            ) from None
        return self
