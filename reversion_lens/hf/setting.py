"""Hugging Face histories as a setting of the experiment runner (``setting = "hf"``, an ``[hf]`` table).

The history is ``base`` (, ``chain`` ...) , ``aligned``: model specs, or an alignment phase run here
(``[hf.align]``: the base fine-tuned on refusal data; the aligned weights are cached under
``<cache_dir>/hf/aligned-<key>/`` so every seed and every rerun shares one). It is the same for every
seed: a seed changes the fine-tuning data order and the random control direction, so seeds measure the
run-to-run spread of fine-tuning, not of the history.

Text goes through the aligned model's tokenizer and, with ``chat = "auto"``, its chat template. Every
evaluation generates greedy responses to ``eval_harmful`` (harm rate: compliance, judged by ``judge``;
refusal rate) and ``eval_benign`` (over-refusal rate) and scores ``heldout`` pairs teacher-forced (task
loss and next-token accuracy); the responses are written as JSONL beside the run.
"""

import dataclasses
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..history import Checkpoint, History
from ..io import FileLock, config_hash, read_json, save_tensors, write_json
from ..specs import check_compatible, parse_spec
from .config import HFConfig
from .data import MixedBatchSource, read_examples_from, read_prompts_from

__all__ = ["HFSetting", "HFHistory"]


class HFSetting:
    """``setting = "hf"``: see the module docstring and :class:`~reversion_lens.hf.config.HFConfig`."""

    resolve_paths = staticmethod(HFConfig.resolve_paths)

    def __init__(self, config: Any):
        self.config = config
        self.hf = HFConfig.from_params(config.params)
        self.track_weights = self.hf.track_weights
        self.probe_batch_size = self.hf.probe_batch_size
        opts = {"device": self.hf.device if self.hf.device_map is None else None, "dtype": self.hf.dtype,
                "device_map": self.hf.device_map}  # fmt: skip
        self.specs = {"base": parse_spec(self.hf.base, **opts)}
        for i, c in enumerate(self.hf.chain):
            self.specs[f"chain{i}"] = parse_spec(c, **opts)
        if self.hf.aligned is not None:
            self.specs["aligned"] = parse_spec(self.hf.aligned, **opts)
        check_compatible(self.specs)  # configs compared before any weights load
        sig = self.specs["base"].signature()
        self.n_layers: int | None = None if sig is None else int(sig["n_layers"])
        self.device = str(self.specs["base"].resolved_device() or "cpu")
        self.cache = Path(config.resolved_cache_dir()) / "hf"
        from .evaluate import check_judge

        check_judge(self.hf.judge)
        _check_sources(self.hf)

    def history_id(self, seed: int) -> str:
        """The same for every seed: the checkpoints, probes and site (so seeds share one preparation)."""
        return "hf-" + config_hash({"history": self.hf.history_fields(), "site": self.config.site,
                                    "direction": self.config.direction})  # fmt: skip

    def evaluation_id(self, seed: int) -> str:
        return "hf-eval-" + config_hash({"history": self.history_id(seed), "eval": self.hf.evaluation_fields()})

    def history(self, seed: int) -> "HFHistory":
        return HFHistory(self, seed)


def _check_sources(hf: HFConfig) -> None:
    """Every local data file exists (before any model loads)."""
    from ..errors import SpecError

    sources = [
        (k, getattr(hf, k)) for k in ("probes", "finetune", "rehearsal", "eval_harmful", "eval_benign", "heldout")
    ]
    if hf.align is not None:
        sources.append(("align.data", hf.align.data))
    for name, src in sources:
        if src is not None and not src.path.startswith("hf:") and not Path(src.path).expanduser().is_file():
            raise SpecError(f"[hf] {name}: {src.path}: no such file. Give a .txt, .jsonl, .json or .csv file, "
                            "hf:OWNER/NAME or harmbench:test.")  # fmt: skip


class HFHistory:
    """One seed's view of the (seed-independent) history; tokenised data are built once per process."""

    def __init__(self, setting: HFSetting, seed: int):
        self.setting, self.hf, self.seed = setting, setting.hf, int(seed)
        names = list(setting.specs)
        checkpoints = [setting.specs[n].checkpoint(n) for n in names if n != "aligned"]
        if "aligned" in setting.specs:
            checkpoints.append(setting.specs["aligned"].checkpoint("aligned"))
        else:
            base = setting.specs["base"]
            checkpoints.append(Checkpoint("aligned", self._load_aligned, {"kind": "aligned by [hf.align]",
                                          "base": str(base), "align": dataclasses.asdict(self.hf.align)},
                                          base.checkpoint("base").signature_hint))  # fmt: skip
        self.history = History(checkpoints)
        self.meta: dict[str, Any] = {"specs": {n: str(s) for n, s in setting.specs.items()}}
        self._text_model: Any = None  # the aligned model, loaded once to tokenise; handed to the first load("aligned")
        self._cache: dict[str, Any] = {}

    # -------------------------------------------------------------- checkpoints
    def load(self, name: str) -> Any:
        if name == "aligned" and self._text_model is not None:
            model, self._text_model = self._text_model, None
            return model
        return self.history.load(name)

    def _aligned_folder(self) -> Path:
        key = config_hash({"base": str(self.setting.specs["base"]), "align": dataclasses.asdict(self.hf.align),
                           "chat": self.hf.chat, "system": self.hf.system, "dtype": self.hf.dtype})  # fmt: skip
        return self.setting.cache / f"aligned-{key}"

    def _load_aligned(self) -> Any:
        """The base, fine-tuned by the alignment phase (trained once, then loaded from the cache)."""
        from ..io import load_tensors

        folder = self._aligned_folder()
        with FileLock(folder.parent / f".{folder.name}.lock"):
            if not (folder / "meta.json").exists():
                self._align(folder)
            model = self.setting.specs["base"].load()
            state, _ = load_tensors(folder / "model.safetensors")
            device = next(model.parameters()).device
            model.load_state_dict({k: v.to(device) for k, v in state.items()})
            model.eval()
        self.meta["align"] = read_json(folder / "meta.json")
        return model

    def _align(self, folder: Path) -> None:
        import time

        from ..text import TextBatchSource
        from ..training import OptimConfig, _model_state, finetune

        a = self.hf.align
        t0 = time.perf_counter()
        model = self.setting.specs["base"].load()
        examples = read_examples_from(a.data)
        data = TextBatchSource(
            model, examples, batch_size=a.batch_size, seed=a.seed, chat=self.hf.chat, system=self.hf.system
        )
        optim = OptimConfig(optimizer="adamw", lr=a.lr, betas=self.hf.betas, weight_decay=a.weight_decay,
                            grad_clip=self.hf.grad_clip)  # fmt: skip
        losses = finetune(model, data, a.steps, optim=optim, seed=a.seed, progress=None, desc="alignment phase")
        save_tensors(folder / "model.safetensors", _model_state(model), {"kind": "aligned_weights"})
        write_json(folder / "meta.json", {"losses": list(losses), "seconds": time.perf_counter() - t0,
                                          "n_examples": len(examples), "data": data.describe()})  # fmt: skip

    def prepare_finetune(self, model: Any) -> Any:
        """The model to fine-tune: with ``[hf.lora]``, LoRA adapters added and every other weight frozen."""
        if self.hf.lora is not None:
            from ..lora import apply_lora

            apply_lora(model, r=self.hf.lora.r, alpha=self.hf.lora.alpha, target_modules=self.hf.lora.target_modules,
                       dropout=self.hf.lora.dropout, seed=self.seed)  # fmt: skip
        return model

    def save_model(self, model: Any, folder: str | os.PathLike) -> Path:
        """Write ``model`` as a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads."""
        from ..hf_export import save_hf

        return save_hf(model, folder, overwrite=True)

    # -------------------------------------------------------------- text
    def _model(self) -> Any:
        """A model to tokenise with (the aligned one: its tokenizer and chat template)."""
        if "model" not in self._cache:
            self._text_model = self.history.load("aligned")
            self._cache["model"] = self._text_model
        return self._cache["model"]

    @property
    def tokenizer(self) -> Any:
        return getattr(self._model(), "tokenizer", None)

    def _probes(self, key: str, source: Any, name: str) -> Any:
        from ..text import text_probes

        if key not in self._cache:
            prompts = read_prompts_from(source)
            self._cache[key] = text_probes(self._model(), prompts, chat=self.hf.chat, system=self.hf.system, name=name)
        return self._cache[key]

    def probes(self) -> Any:
        return self._probes("probes", self.hf.probes, "probes")

    def finetune_data(self, data: str, seed: int) -> Any:
        from ..text import TextBatchSource

        if self.hf.finetune is None:
            raise ConfigError("[hf] finetune is not set: fine-tuning runs need benign prompt/response data.")
        opts = dict(batch_size=self.hf.batch_size, chat=self.hf.chat, system=self.hf.system)
        benign = TextBatchSource(self._model(), read_examples_from(self.hf.finetune), seed=seed, **opts)
        if data == "benign":
            return benign
        if data == "rehearsal":
            if self.hf.rehearsal is None:
                raise ConfigError("arm control:rehearsal needs [hf] rehearsal = <alignment prompt/response data>.")
            rehearsal = TextBatchSource(self._model(), read_examples_from(self.hf.rehearsal), seed=seed + 1, **opts)
            return MixedBatchSource(benign, rehearsal, self.hf.rehearsal_fraction)
        raise ConfigError(f"unknown fine-tuning data {data!r}; use 'benign' or 'rehearsal'.")

    def finetune_optim(self, **overrides: Any) -> Any:
        from ..training import OptimConfig

        h = self.hf
        base = OptimConfig(optimizer=h.optimizer, lr=h.lr, betas=h.betas, weight_decay=h.weight_decay,
                           warmup_steps=h.warmup_steps, grad_clip=h.grad_clip)  # fmt: skip
        return dataclasses.replace(base, **overrides)

    # -------------------------------------------------------------- evaluation
    def _evaluator(self) -> Any:
        if "evaluator" not in self._cache:
            from .evaluate import make_evaluator

            self._cache["evaluator"] = make_evaluator(self.hf, self._model())
        return self._cache["evaluator"]

    def evaluate(self, model: Any) -> dict[str, Any]:
        return self._evaluator()(model)
