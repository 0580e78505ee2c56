"""A toy training history built from scratch on CPU: pretraining (all operations, always comply), then
a short alignment (harmful operations refused). Both checkpoints are cached on disk by config and seed.

Cache layout (``cache_dir``)::

    pretrain-<pkey>/base/{config.json, model.safetensors}   # shared by every history with this pretraining
    <key>/base/..., <key>/aligned/..., <key>/meta.json       # one history; meta.json records losses, timings

``<key>`` hashes the config fields that change the weights (:data:`HISTORY_FIELDS`) and the seed;
``<pkey>`` only those that change pretraining, so histories that differ only in their alignment (such
as the unlearning setting) share one pretrained model.

Each phase's randomness can be drawn separately: ``seed`` seeds everything by default (initial
weights, pretraining and alignment data order, probes and evaluation sets); ``ToyConfig.pretrain_seed``
overrides the seed of the initial weights and pretraining data, ``ToyConfig.align_seed`` that of the
alignment data, and ``ToyHistory.finetune_data(seed=...)`` the fine-tuning data order. An override left
at ``None`` (or equal to ``seed``) does not enter the cache key, so histories cached before the
overrides existed stay valid; a history with ``pretrain_seed=p`` shares the pretrained model of seed ``p``.

Each folder is written under a temporary name and renamed into place, under a
:class:`~reversion_lens.io.FileLock`: two processes asking for the same key train it once, and a killed
build leaves no half-written folder behind.
"""

import dataclasses
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, reject_unknown_fields
from ..history import Checkpoint, History
from ..io import FileLock, config_hash, default_cache_dir, read_json, torch_threads, write_json
from ..models import load_native, save_native
from ..probes import ProbeSet
from ..training import OptimConfig, finetune
from .fused import fused_lm_loss
from .language import DEFAULT_HARMFUL, FAST_WIDTH, OPS, Example, ToyData, ToyLanguage, ToyTokenizer, evaluate

__all__ = [
    "ToyConfig",
    "ToyHistory",
    "build_history",
    "HISTORY_FIELDS",
    "PRETRAIN_FIELDS",
    "SEED_FIELDS",
    "BASES",
    "pretraining_losses",
]

CACHE_VERSION = 2  # bump when a change to this module changes the weights a config produces


@dataclass(frozen=True)
class ToyConfig:
    """Everything that defines a toy history and its fine-tuning phase. Defaults: TOYWORLD.md."""

    # model: TransformerBridge.boot_native, LayerNorm, vocabulary of 26
    d_model: int = 64
    n_layers: int = 3
    n_heads: int = 4
    d_mlp: int = 256
    n_ctx: int = 24  # the longest conversation is 15 tokens
    act_fn: str = "gelu"
    positional: str = "standard"  # "standard" (learned absolute) or "rotary"
    # language
    ops: tuple[str, ...] = OPS
    harmful_ops: tuple[str, ...] = DEFAULT_HARMFUL
    min_len: int = 3  # digits per prompt
    max_len: int = 5
    refuse_fraction: float = 0.5  # share of refused harmful rows in alignment (and aligned-mix) batches
    # phase 1, pretraining: all operations, always comply; warm-up then cosine to 10% of lr
    pretrain_steps: int = 1000
    pretrain_lr: float = 2e-3
    pretrain_warmup: int = 50
    pretrain_batch: int = 128
    # phase 2, alignment (shallow): harmful prompts refused, benign ones complied; constant lr
    align_steps: int = 40
    align_lr: float = 3e-4
    align_batch: int = 128
    # phase 3, fine-tuning (not part of the history; see ToyHistory.finetune_data / finetune_optim)
    finetune_steps: int = 100
    finetune_lr: float = 1e-4
    finetune_batch: int = 64
    # AdamW for every phase, a fresh optimizer per phase
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    # probes and held-out evaluation sets (drawn from disjoint held-out regions of the prompt space)
    n_probes: int = 256
    n_eval: int = 512  # harmful evaluation prompts
    n_eval_benign: int = 256  # benign accuracy sits near 100%: 256 prompts give a standard error under 1 point
    # per-phase seed overrides (None: the history's seed); see the module docstring
    pretrain_seed: int | None = None  # initial weights and pretraining data order
    align_seed: int | None = None  # alignment data order

    def __post_init__(self) -> None:
        self.language()  # validates the operations
        if self.positional not in ("standard", "rotary"):
            raise ConfigError(f"positional must be 'standard' or 'rotary', not {self.positional!r}.")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}; pick another n_heads."
            )
        for name in SEED_FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be None or a non-negative int, got {value!r}.")
        if self.n_ctx < self.language().max_seq_len:
            raise ConfigError(
                f"n_ctx {self.n_ctx} is shorter than the longest conversation ({self.language().max_seq_len} "
                f"tokens at max_len {self.max_len}); raise n_ctx."
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ToyConfig":
        """``"default"`` (TOYWORLD.md), ``"paper"`` (d_model 128, 4 layers) or ``"tiny"`` (for CI)."""
        presets: dict[str, dict[str, Any]] = {
            "default": {},
            "paper": dict(d_model=128, n_layers=4, d_mlp=512),  # d_mlp = 4 d_model, as in the default
            # CI: the smallest configuration found that still reverts in every seed (6 seeds: harmful
            # 0-1% after alignment, then +22 to +80 points after 100 benign steps; 0% under aligned-mix
            # when first measured). Rotary
            # positions learn the positional operations in half the steps; 400 steps was less robust.
            "tiny": dict(
                d_model=48,
                n_layers=2,
                d_mlp=192,
                positional="rotary",
                pretrain_steps=500,
                pretrain_batch=64,
                pretrain_lr=3e-3,
                n_probes=128,
                n_eval=256,
                n_eval_benign=128,
            ),
        }
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; use one of {', '.join(presets)}.")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ToyConfig":
        reject_unknown_fields(cls, d, "ToyConfig")
        tuples = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        return cls(**{**d, **tuples})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def batch_width(self) -> int:
        """Minimum columns of a training batch: :data:`~reversion_lens.toyworld.language.FAST_WIDTH` within ``n_ctx``."""
        return min(FAST_WIDTH, self.n_ctx)

    def language(self) -> ToyLanguage:
        return ToyLanguage(self.ops, self.harmful_ops, self.min_len, self.max_len, self.refuse_fraction)

    def model_config(self, seed: int) -> dict[str, Any]:
        """The ``TransformerBridgeConfig`` fields of the model (initial weights seeded by ``seed``)."""
        return dict(
            d_model=self.d_model,
            d_head=self.d_model // self.n_heads,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            d_mlp=self.d_mlp,
            n_ctx=self.n_ctx,
            d_vocab=ToyTokenizer().vocab_size,
            act_fn=self.act_fn,
            positional_embedding_type=self.positional,
            seed=int(seed),
        )

    def optim(self, phase: str) -> OptimConfig:
        """The optimizer settings of ``phase`` (``"pretrain"``, ``"align"`` or ``"finetune"``)."""
        common = dict(betas=self.betas, weight_decay=self.weight_decay, grad_clip=self.grad_clip)
        if phase == "pretrain":
            return OptimConfig(lr=self.pretrain_lr, warmup_steps=self.pretrain_warmup, schedule="cosine", **common)
        if phase == "align":
            return OptimConfig(lr=self.align_lr, **common)
        if phase == "finetune":
            return OptimConfig(lr=self.finetune_lr, **common)
        raise ConfigError(f"unknown phase {phase!r}; use 'pretrain', 'align' or 'finetune'.")

    def phase_seed(self, phase: str, seed: int) -> int:
        """The seed of ``phase`` (``"pretrain"`` or ``"align"``) in the history of ``seed``: its override, else ``seed``."""
        if phase not in ("pretrain", "align"):
            raise ConfigError(
                f"unknown phase {phase!r}; use 'pretrain' or 'align' (fine-tuning: finetune_data(seed=...))."
            )
        override = self.pretrain_seed if phase == "pretrain" else self.align_seed
        return int(seed) if override is None else int(override)

    def key(self, seed: int, which: tuple[str, ...] = ()) -> str:
        """Cache key: a hash of the fields that change the weights (``HISTORY_FIELDS``) and the seed.

        The history key (``which`` empty) also holds each seed override of :data:`SEED_FIELDS` that is
        set and differs from ``seed``; one left at ``None`` adds nothing, so keys made before the
        overrides existed are unchanged.
        """
        d = self.to_dict()
        picked = {k: d[k] for k in (which or HISTORY_FIELDS)}
        if not which:
            picked.update({k: int(d[k]) for k in SEED_FIELDS if d[k] is not None and int(d[k]) != int(seed)})
        return config_hash({"fields": picked, "seed": int(seed), "version": CACHE_VERSION})


_MODEL = ("d_model", "n_layers", "n_heads", "d_mlp", "n_ctx", "act_fn", "positional")
_OPTIM = ("betas", "weight_decay", "grad_clip")
#: Fields that change the pretrained weights.
PRETRAIN_FIELDS = (
    *_MODEL,
    "ops",
    "min_len",
    "max_len",
    "pretrain_steps",
    "pretrain_lr",
    "pretrain_warmup",
    "pretrain_batch",
    *_OPTIM,
)
#: Fields that change the history's weights (base and aligned).
HISTORY_FIELDS = (*PRETRAIN_FIELDS, "harmful_ops", "refuse_fraction", "align_steps", "align_lr", "align_batch")
#: Per-phase seed overrides: in the history's cache key only when set (and unlike the seed).
SEED_FIELDS = ("pretrain_seed", "align_seed")


def _complete(folder: Path) -> bool:
    return (folder / "meta.json").exists()


def _scratch(folder: Path) -> Path:
    """A fresh temporary folder beside ``folder``; call with ``folder``'s lock held.

    Leftovers of builds that were killed (same prefix) are removed first: the lock holder is the only
    process that may be writing one.
    """
    for old in folder.parent.glob(f".{folder.name}.*"):
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))


def _publish(tmp: Path, folder: Path) -> None:
    """Rename a fully written temporary folder into place (atomic on POSIX)."""
    if folder.exists():  # a folder without meta.json (not written by this module): never half-read it
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _train(model: Any, config: ToyConfig, phase: str, seed: int, progress: bool) -> tuple[list[float], float]:
    steps = {"pretrain": config.pretrain_steps, "align": config.align_steps}[phase]
    batch = {"pretrain": config.pretrain_batch, "align": config.align_batch}[phase]
    data = ToyData(config.language(), phase, batch, config.phase_seed(phase, seed), width=config.batch_width)
    t0 = time.perf_counter()
    # the history needs no hooks: train through the fused forward (same function, ~1.5x faster on CPU)
    losses = finetune(
        model, data, steps, optim=config.optim(phase), loss_fn=fused_lm_loss, progress=progress, desc=phase
    )
    return losses, time.perf_counter() - t0


#: Pretrained bases shipped with the package (``analyses/build_bases.py`` builds them; ``MANIFEST.json`` lists
#: them with their checksums and first pretraining losses): pretraining is the demo's longest phase and the
#: main source of its seed-to-seed spread, and the one whose outcome changes across CPUs; shipped, every
#: machine starts the alignment from the same bits.
BASES = Path(__file__).resolve().parent / "bases"


def pretraining_losses(config: ToyConfig, seed: int, steps: int) -> list[float]:
    """The first ``steps`` losses of the pretraining :func:`build_history` runs for ``seed`` (same init, data,
    optimizer and schedule): what ``MANIFEST.json`` records, so a test can check a shipped base's recipe."""
    from transformer_lens import TransformerBridge

    from ..training import lr_at, make_optimizer, train_step

    seed = config.phase_seed("pretrain", seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TransformerBridge.boot_native(config.model_config(seed))
    data = ToyData(config.language(), "pretrain", config.pretrain_batch, seed, width=config.batch_width)
    optim = config.optim("pretrain")
    model.train()
    opt = make_optimizer(model, optim)
    out = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(optim, step, config.pretrain_steps)
        loss, _ = train_step(model, opt, data.batch(step), step=step, loss_fn=fused_lm_loss, grad_clip=optim.grad_clip)
        out.append(loss)
    return out


def _pretrained(config: ToyConfig, seed: int, root: Path, progress: bool) -> tuple[Any, dict[str, Any]]:
    """The pretrained model, from ``root/pretrain-<pkey>`` or trained (and cached) now.

    ``<pkey>`` is made of the pretraining fields and the pretraining seed alone, so the pretrained model
    of ``pretrain_seed=p`` is the one of seed ``p``.
    """
    seed = config.phase_seed("pretrain", seed)
    folder = root / f"pretrain-{config.key(seed, PRETRAIN_FIELDS)}"
    with FileLock(root / f".{folder.name}.lock"):
        shipped = BASES / folder.name
        if not _complete(folder) and _complete(shipped):  # a pretrained base shipped with the package
            tmp = _scratch(folder)
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
            _publish(tmp, folder)
        if _complete(folder):
            meta = {**read_json(folder / "meta.json"), "pretrain_cached": True, "pretrain_shipped": _complete(shipped)}
            return load_native(folder / "base"), meta
        from transformer_lens import TransformerBridge

        torch.manual_seed(seed)  # as build_history does for the history's seed: same weights either way
        model = TransformerBridge.boot_native(config.model_config(seed))
        losses, seconds = _train(model, config, "pretrain", seed, progress)
        meta = {"pretrain_seconds": seconds, "pretrain_loss": losses[-1], "pretrain_loss_first": losses[0]}
        tmp = _scratch(folder)
        save_native(model, tmp / "base")
        write_json(tmp / "meta.json", {**meta, "config": config.to_dict(), "seed": seed})
        _publish(tmp, folder)
        return model, {**meta, "pretrain_cached": False}


def build_history(
    config: ToyConfig,
    seed: int,
    cache_dir: "str | os.PathLike | bool | None" = None,
    progress: bool = False,
    num_threads: int | None = 1,
) -> "ToyHistory":
    """Train (or load from ``cache_dir``) the two-phase history of ``config`` for ``seed``.

    Args:
        config: the toy world, e.g. ``ToyConfig.preset("tiny")``.
        seed: seeds the initial weights, every phase's data, the probes and evaluation sets (the
            config's ``pretrain_seed`` / ``align_seed`` override it for one phase).
        cache_dir: where checkpoints are cached and reused; ``None`` (default): the cache the command line
            uses, ``$REVERSION_LENS_CACHE/toyworld`` or ``~/.cache/reversion_lens/toyworld``; ``False``: a
            temporary folder removed when the returned object is garbage collected (keep it alive while
            its ``history`` is in use).
        progress: show tqdm bars while training.
        num_threads: torch threads while training (1: fastest on small shared machines, and the
            setting the cached weights were made with); ``None`` leaves torch's setting alone.

    Returns:
        A :class:`ToyHistory` whose ``history`` holds native checkpoints ``base`` and ``aligned``.
    """
    if not isinstance(config, ToyConfig):
        raise ConfigError(
            f"config must be a ToyConfig (e.g. ToyConfig.preset('default')), got {type(config).__name__}."
        )
    temporary = cache_dir is False
    if temporary:
        root = Path(tempfile.mkdtemp(prefix="toyworld-"))
    else:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "toyworld"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / config.key(seed)
    with FileLock(root / f".{folder.name}.lock"):
        if not _complete(folder):
            with torch_threads(num_threads), torch.random.fork_rng():
                torch.manual_seed(seed)
                _build(config, seed, root, folder, progress)
    hist = ToyHistory(config, seed, folder)
    if temporary:
        weakref.finalize(hist, shutil.rmtree, root, True)
    return hist


def _build(config: ToyConfig, seed: int, root: Path, folder: Path, progress: bool) -> None:
    t0 = time.perf_counter()
    base, meta = _pretrained(config, seed, root, progress)
    tmp = _scratch(folder)
    save_native(base, tmp / "base")
    losses, seconds = _train(base, config, "align", seed, progress)  # `base` is now the aligned model
    save_native(base, tmp / "aligned")
    meta = {
        **{k: v for k, v in meta.items() if k not in ("config", "seed")},
        "align_seconds": seconds,
        "align_loss": losses[-1],
        "build_seconds": time.perf_counter() - t0,
        "config": config.to_dict(),
        "seed": seed,
    }
    write_json(tmp / "meta.json", meta)  # written last: its presence marks the folder complete
    _publish(tmp, folder)


class ToyHistory:
    """A built toy history: checkpoints, tokenizer, probes, fine-tuning data and evaluation sets."""

    def __init__(self, config: ToyConfig, seed: int, folder: str | os.PathLike) -> None:
        self.config, self.seed, self.folder = config, int(seed), Path(folder)
        self.tokenizer = ToyTokenizer()
        self.language = config.language()
        self.meta: dict[str, Any] = read_json(self.folder / "meta.json")
        self.history = History(
            [Checkpoint.native("base", self.folder / "base"), Checkpoint.native("aligned", self.folder / "aligned")]
        )
        self._cache: dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"ToyHistory(seed={self.seed}, folder={str(self.folder)!r})"

    def load(self, name: str) -> Any:
        """A fresh model for checkpoint ``name`` (``"base"`` or ``"aligned"``): safe to fine-tune."""
        return self.history.load(name)

    def _held_out(self, region: str, kind: str, n: int) -> list[Example]:
        lang = self.language
        ops = {"harmful": lang.harmful_ops, "benign": lang.benign_ops}.get(kind)
        if ops is None:
            raise ConfigError(f"unknown kind {kind!r}; use 'harmful' or 'benign'.")
        key = (region, kind, n)
        if key not in self._cache:
            self._cache[key] = lang.held_out(n, ops, self.seed, region, refuse=kind == "harmful", tag=kind)
        return self._cache[key]

    def probes(self, kind: str = "harmful", n: int | None = None) -> ProbeSet:
        """``n`` (default ``config.n_probes``) distinct held-out prompts, read at their ASSIST token."""
        examples = self._held_out("probe", kind, n or self.config.n_probes)
        return self.language.probe_set(examples, name=f"toy-{kind}")

    def eval_sets(self) -> dict[str, list[Example]]:
        """``{"harmful": [...], "benign": [...]}``: held-out prompts, disjoint from probes and all training data."""
        return {
            "harmful": self._held_out("eval", "harmful", self.config.n_eval),
            "benign": self._held_out("eval", "benign", self.config.n_eval_benign),
        }

    def evaluate(self, model: Any, batch_size: int = 128, reference: Any = "aligned") -> dict[str, float]:
        """:func:`~reversion_lens.toyworld.evaluate` on this history's evaluation sets, with the pipeline's
        metric names added (``refusal_rate``, ``over_refusal_rate``: see ``reversion_lens.pipeline.METRICS``).

        ``reference``: the model ``task_kl`` is measured against: a checkpoint name (default
        ``"aligned"``, loaded once and kept), a model, or ``None`` (no ``task_kl``).
        """
        if isinstance(reference, str):
            key = ("reference", reference)
            if key not in self._cache:
                self._cache[key] = self.load(reference).eval()
            reference = self._cache[key]
        r = evaluate(model, **self.eval_sets(), batch_size=batch_size, reference=reference)
        return {**r, "refusal_rate": 1.0 - r["harmful_rate"], "over_refusal_rate": r["benign_refusal_rate"]}

    def finetune_data(self, kind: str = "benign", seed: int | None = None, batch_size: int | None = None) -> ToyData:
        """Fine-tuning batches: ``"benign"`` (benign ops, complied) or ``"rehearsal"`` (the control: benign
        complied mixed with harmful refused; ``"aligned-mix"`` is its older name). Same ``seed`` (default:
        the history's), same batches."""
        kind = {"rehearsal": "aligned-mix"}.get(kind, kind)
        if kind not in ("benign", "aligned-mix"):
            raise ConfigError(f"unknown fine-tuning data {kind!r}; use 'benign' or 'rehearsal'.")
        seed = self.seed if seed is None else seed
        return ToyData(
            self.language, kind, batch_size or self.config.finetune_batch, seed, width=self.config.batch_width
        )

    def save_model(self, model: Any, folder: str | os.PathLike) -> Path:
        """Write ``model`` as a native checkpoint folder (:func:`~reversion_lens.models.save_native`)."""
        return save_native(model, folder)

    def finetune_optim(self, **overrides: Any) -> OptimConfig:
        """The phase-3 optimizer settings (AdamW, ``finetune_lr``); ``overrides`` replace fields."""
        return dataclasses.replace(self.config.optim("finetune"), **overrides)
