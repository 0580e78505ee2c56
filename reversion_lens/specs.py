"""Model specs: one string names a model state wherever a model is named (CLI, configs, histories).

=========================================  ============================================================
spec                                       meaning
=========================================  ============================================================
``gpt2``, ``Qwen/Qwen2.5-0.5B-Instruct``   a Hugging Face hub model (needs hub access, or the local cache)
``NAME@REV``                               at a revision (branch, tag or commit), e.g. ``gpt2@main``
``EleutherAI/pythia-160m@step1000``        a training checkpoint (``checkpoint_value=1000``) for families
                                           with published checkpoints (Pythia; ``@1000`` works too)
``./runs/aligned`` (a folder)              a local Hugging Face directory, or a native checkpoint
                                           written by :func:`reversion_lens.models.save_native`
``gguf:PATH``, ``model.gguf``               a GGUF file (llama.cpp), dequantized by ``transformers`` (needs
                                           ``pip install gguf``); ``PATH`` may be a folder holding exactly
                                           one ``.gguf`` file, and such a folder (without ``config.json``)
                                           is a GGUF spec by itself
=========================================  ============================================================

Everything that can be checked without loading weights is checked when the spec is made
(:func:`parse_spec`), so a bad spec fails before any work starts:

* a name that is neither a local folder nor in the local Hugging Face cache while ``HF_HUB_OFFLINE=1``
  (online: a name, revision or gated model that the hub rejects; only ``config.json`` is fetched);
* a revision or step for a local folder (folders have no revisions: one folder per checkpoint);
* a step that the model family does not have (TransformerLens's own label list, local data);
* a folder that is neither a Hugging Face model nor a native checkpoint nor holds one ``.gguf`` file; a
  folder with several ``.gguf`` files; a GGUF spec without the ``gguf`` package; an unknown dtype; a CUDA
  device, or more devices, than the machine has;
* base and aligned specs whose configs disagree (:func:`check_compatible`, from ``config.json`` alone).

Placement options go to ``TransformerBridge.boot_transformers`` (TransformerLens 4.3): ``device``
(one device; ``"auto"`` = CUDA when available), or ``device_map`` (``"auto"``, ``"balanced"``,
``"balanced_low_0"``, ``"sequential"`` or a dict module -> device, dispatched by accelerate; excludes
``device``), or ``n_devices`` (split over that many CUDA GPUs; TL turns it into ``device_map="balanced"``
with a per-GPU ``max_memory``). Extra ``boot_transformers`` keywords (``max_memory``, ``n_ctx``,
``trust_remote_code``) go in ``hf_kwargs``. Native checkpoints and GGUF files load on one device only.
"""

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import IncompatibleCheckpointsError, SpecError
from .models import (
    GGUF_SUFFIX,
    dir_signature,
    find_gguf,
    gguf_signature,
    is_hf_dir,
    is_native_dir,
    load_gguf,
    load_hf,
    load_native,
    parse_dtype,
    require_gguf,
)

__all__ = ["ModelSpec", "parse_spec", "as_spec", "check_compatible", "make_history", "hub_offline"]

KINDS = ("hub", "hf_dir", "native", "gguf")
GGUF_PREFIX = "gguf:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: only the local cache is usable."""
    truthy = ("1", "TRUE", "YES", "ON")
    return any(os.environ.get(v, "").upper() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass(frozen=True)
class ModelSpec:
    """A model state to load: a hub name (with a revision or training step), a local HF folder, a native one
    or a GGUF file.

    Build with :func:`parse_spec` (which validates); :meth:`load` returns a ``TransformerBridge``.

    Attributes:
        name: the hub repo id (aliases resolved), the folder's absolute path, or the ``.gguf`` file's.
        kind: ``"hub"``, ``"hf_dir"``, ``"native"`` or ``"gguf"``.
        revision: a hub revision (branch, tag, commit).
        checkpoint_value: a training step of a checkpointed family (Pythia ``step{value}``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` (CUDA when available) or ``None`` (CPU).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` ... or ``None`` (float32).
        n_devices: split a hub / HF-folder model over this many CUDA GPUs.
        device_map: an accelerate device map (string or dict); excludes ``device``.
        hf_kwargs: further ``boot_transformers`` keywords (``max_memory``, ``n_ctx``, ...).
    """

    name: str
    kind: str
    revision: str | None = None
    checkpoint_value: int | None = None
    device: str | None = None
    dtype: str | None = None
    n_devices: int | None = None
    device_map: str | dict[str, Any] | None = None
    hf_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------ text
    def __str__(self) -> str:
        if self.checkpoint_value is not None:
            return f"{self.name}@step{self.checkpoint_value}"
        return f"{self.name}@{self.revision}" if self.revision else self.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (for ``config.json``); ``spec`` is the canonical string."""
        return {"spec": str(self), **dataclasses.asdict(self)}

    @property
    def is_local(self) -> bool:
        return self.kind in ("hf_dir", "native", "gguf")

    # ------------------------------------------------------------------ checks
    def validate(self) -> "ModelSpec":
        """Every check that needs no weights; returns ``self``. See the module docstring."""
        if self.kind not in KINDS:
            raise SpecError(f"unknown spec kind {self.kind!r}; use one of {KINDS}.")
        if self.is_local and (self.revision is not None or self.checkpoint_value is not None):
            raise SpecError(
                f"{self.name} is a local directory; it has no revisions or training steps (got "
                f"{'@' + (self.revision or f'step{self.checkpoint_value}')}). Save each checkpoint to its own "
                "directory and name that directory instead."
            )
        if self.revision is not None and self.checkpoint_value is not None:
            raise SpecError(f"{self.name}: give a revision or a training step, not both.")
        parse_dtype(self.dtype)
        self._check_placement()
        if self.kind == "gguf":
            find_gguf(self.name)
            require_gguf()
        if self.kind == "hub":
            if self.checkpoint_value is not None:
                _check_step(self.name, self.checkpoint_value)
            if hub_offline():
                self._check_cached()
            else:
                self._check_hub()
        return self

    def _check_placement(self) -> None:
        if self.device_map is not None and self.device is not None:
            raise SpecError(
                f"{self}: device={self.device!r} and device_map={self.device_map!r} both given; they are "
                "mutually exclusive (TransformerLens boot_transformers). Pass one of them."
            )
        if self.kind in ("native", "gguf") and (self.device_map is not None or (self.n_devices or 1) > 1):
            what = "a native checkpoint" if self.kind == "native" else "a GGUF file"
            raise SpecError(
                f"{self.name} is {what}, which loads on one device; drop device_map / n_devices "
                "and pass device= instead."
            )
        if self.n_devices is not None:
            if self.n_devices < 1:
                raise SpecError(f"n_devices must be >= 1, got {self.n_devices}.")
            if self.n_devices > 1 and torch.cuda.device_count() < self.n_devices:
                raise SpecError(
                    f"n_devices={self.n_devices} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                    "lower n_devices or run where there are more GPUs."
                )
        if self.device is not None and self.device != "auto":
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise SpecError(f"unknown device {self.device!r} ({e}); use cpu, cuda, cuda:1, mps or auto.") from e
            if dev.type == "cuda":
                n = torch.cuda.device_count()
                if n == 0 or (dev.index is not None and dev.index >= n):
                    raise SpecError(
                        f"device {self.device!r} requested but this machine has {n} CUDA device(s); "
                        "use --device cpu (or auto)."
                    )

    def _check_cached(self) -> None:
        from huggingface_hub import try_to_load_from_cache

        rev = self.hub_revision()
        config = try_to_load_from_cache(self.name, "config.json", revision=rev)
        where = f"{self.name!r}" + (f" at revision {rev!r}" if rev else "")
        if not isinstance(config, str):
            raise SpecError(
                f"{where} is not a local directory and is not in the local Hugging Face cache, and "
                "HF_HUB_OFFLINE=1 is set, so it cannot be downloaded. Check the name (and revision / step), "
                f"download it once with hub access (`hf download {self.name}"
                + (f" --revision {rev}" if rev else "")
                + "`), or pass a local model directory."
            )
        if not any(isinstance(try_to_load_from_cache(self.name, f, revision=rev), str) for f in _WEIGHT_FILES):
            raise SpecError(
                f"the config of {where} is cached but not its weights, and HF_HUB_OFFLINE=1 is set. Download "
                "it completely once with hub access, or pass a local model directory."
            )

    def _check_hub(self) -> None:
        """Online: fetch only ``config.json`` (into the cache), so a wrong name, revision or a gated model is
        reported before any weights download. Network trouble is left to the load to report."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        rev = self.hub_revision()
        try:
            hf_hub_download(self.name, "config.json", revision=rev)
        except GatedRepoError as e:
            raise SpecError(
                f"{self.name!r} is gated: accept its licence on https://huggingface.co/{self.name} and log in "
                "(`hf auth login` or HF_TOKEN), then retry."
            ) from e
        except RepositoryNotFoundError as e:
            raise SpecError(
                f"{self.name!r} is neither a local directory nor a model on the Hugging Face hub (or it is private "
                "and you are not logged in); check the name or the path."
            ) from e
        except RevisionNotFoundError as e:
            raise SpecError(f"{self.name!r} has no revision {rev!r}; check it on the model's hub page.") from e
        except EntryNotFoundError as e:
            raise SpecError(
                f"{self.name!r} at {rev or 'main'} has no config.json; it is not a transformers model."
            ) from e
        except Exception:
            return

    def hub_revision(self) -> str | None:
        """The hub revision string this spec loads (``step1000`` for Pythia step 1000)."""
        if self.checkpoint_value is not None:
            return _checkpoint_format(self.name).format(value=self.checkpoint_value)
        return self.revision

    def signature(self) -> dict[str, Any] | None:
        """``{n_layers, d_model, d_vocab, architecture}`` from the config alone, or ``None`` if not readable.

        Local folders always have one; hub models have one when their ``config.json`` is in the local cache.
        """
        if self.kind == "gguf":
            return gguf_signature(self.name)
        if self.is_local:
            return dir_signature(self.name)
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(self.name, "config.json", revision=self.hub_revision())
        return dir_signature(Path(path).parent) if isinstance(path, str) else None

    # ------------------------------------------------------------------ loading
    def resolved_device(self) -> str | None:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def load(self) -> Any:
        """A ``TransformerBridge`` in eval mode (HF models) / as booted (native checkpoints)."""
        self.validate()
        if self.kind == "native":
            return load_native(self.name, device=self.resolved_device(), dtype=parse_dtype(self.dtype))
        if self.kind == "gguf":
            return load_gguf(self.name, device=self.resolved_device(), dtype=parse_dtype(self.dtype), **self.hf_kwargs)
        return load_hf(
            self.name,
            revision=self.revision,
            checkpoint_value=self.checkpoint_value,
            device=self.resolved_device(),
            dtype=parse_dtype(self.dtype),
            n_devices=self.n_devices,
            device_map=self.device_map,
            **self.hf_kwargs,
        )

    def checkpoint(self, name: str) -> Any:
        """A lazily loaded :class:`reversion_lens.history.Checkpoint` named ``name``."""
        from .history import Checkpoint

        sig = self.signature()
        hint = None if sig is None else {k: sig[k] for k in ("n_layers", "d_model", "d_vocab")}
        return Checkpoint(name, self.load, {"kind": self.kind, **self.to_dict()}, hint)

    def replace(self, **changes: Any) -> "ModelSpec":
        """A validated copy with some fields changed (``spec.replace(dtype="bfloat16")``)."""
        return dataclasses.replace(self, **changes).validate()


# ---------------------------------------------------------------------- parsing
def _checkpoint_families() -> dict[str, str]:
    from transformer_lens.model_bridge.sources.transformers.helpers import _CHECKPOINT_REVISION_FORMATS

    return dict(_CHECKPOINT_REVISION_FORMATS)


def _checkpoint_format(name: str) -> str:
    for prefix, fmt in _checkpoint_families().items():
        if name.startswith(prefix):
            return fmt
    raise SpecError(
        f"{name!r} has no known training-checkpoint convention (known: {', '.join(_checkpoint_families())}); "
        "give a hub revision instead, e.g. NAME@main or NAME@<commit>."
    )


def _checkpoint_labels(name: str) -> list[int]:
    from transformer_lens.tools.model_registry.checkpoints import get_checkpoint_labels

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # TL warns about the 2023 Pythia re-upload on every lookup
    try:
        labels, _ = get_checkpoint_labels(name)
    finally:
        logging.disable(previous)
    return list(labels)


def _check_step(name: str, value: int) -> None:
    _checkpoint_format(name)
    labels = _checkpoint_labels(name)
    if value not in labels:
        nearest = sorted(labels, key=lambda x: abs(x - value))[:2]
        raise SpecError(
            f"{name} has no checkpoint at step {value}. It has {len(labels)} checkpoints, steps "
            f"{_summarise(labels)}; the nearest are {sorted(nearest)}."
        )


def _summarise(labels: list[int]) -> str:
    if len(labels) <= 12:
        return ", ".join(map(str, labels))
    return f"{', '.join(map(str, labels[:11]))}, ..., {labels[-1]}"


def _resolve_alias(name: str) -> str:
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    return resolve_model_alias(name) or name


def _step_value(name: str, rev: str) -> int | None:
    """``step1000`` / ``1000`` / ``checkpoint-1000`` for a checkpointed family -> 1000; else ``None``."""
    if not any(name.startswith(p) for p in _checkpoint_families()):
        return None
    m = re.fullmatch(r"(?:step|checkpoint-)?(\d+)", rev)
    return int(m.group(1)) if m else None


def parse_spec(text: "str | os.PathLike | ModelSpec", **options: Any) -> ModelSpec:
    """Parse and validate a spec string (see the module docstring); ``options`` set the ModelSpec fields.

    Args:
        text: ``NAME``, ``NAME@REVISION``, ``PYTHIA_NAME@stepN``, a folder path, ``gguf:PATH`` / a ``.gguf``
            file, or a ModelSpec (options then replace its fields).
        options: ``device``, ``dtype``, ``n_devices``, ``device_map``, ``hf_kwargs``; ``None`` values are
            ignored.

    Returns:
        A validated :class:`ModelSpec`. Raises :class:`SpecError` naming the problem and the fix.
    """
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - {"device", "dtype", "n_devices", "device_map", "hf_kwargs"}
    if unknown:
        raise SpecError(
            f"unknown spec option(s) {sorted(unknown)}; use device, dtype, n_devices, device_map, hf_kwargs."
        )
    if "dtype" in options:  # canonical name: "bf16" -> "bfloat16"
        options["dtype"] = str(parse_dtype(options["dtype"])).removeprefix("torch.")
    if isinstance(text, ModelSpec):
        return dataclasses.replace(text, **options).validate()
    raw = os.fspath(text).strip()
    if not raw:
        raise SpecError("empty model spec; give a hub name, NAME@REVISION or a local directory.")
    if raw.startswith(GGUF_PREFIX):
        return ModelSpec(name=str(find_gguf(raw[len(GGUF_PREFIX) :])), kind="gguf", **options).validate()
    path = Path(raw).expanduser()
    if path.exists():
        return ModelSpec(**_local(path), **options).validate()
    head, sep, rev = raw.rpartition("@")
    if sep and Path(head).expanduser().exists():
        raise SpecError(
            f"{head} is a local directory; it has no revisions or training steps (got @{rev}). Save each "
            "checkpoint to its own directory and name that directory instead."
        )
    name = head if sep else raw
    if sep and not rev:
        raise SpecError(f"{raw!r} ends with '@' but names no revision; write NAME@REVISION or just NAME.")
    if not _REPO_ID.match(name) or name.startswith((".", "/", "~")):
        raise SpecError(
            f"{name!r} is not an existing local directory, nor a Hugging Face repo id (OWNER/NAME); check "
            "the path (relative to the current directory) or the name."
        )
    name = _resolve_alias(name)
    step = _step_value(name, rev) if sep else None
    fields: dict[str, Any] = {"name": name, "kind": "hub"}
    if step is not None:
        fields["checkpoint_value"] = step
    elif sep:
        fields["revision"] = rev
    return ModelSpec(**fields, **options).validate()


def _local(path: Path) -> dict[str, Any]:
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        return {"name": str(find_gguf(path)), "kind": "gguf"}
    if not path.is_dir():
        raise SpecError(
            f"{path} is a file; a local model is a directory (a Hugging Face model or a native checkpoint) or a "
            ".gguf file."
        )
    if is_native_dir(path):
        return {"name": str(path.resolve()), "kind": "native"}
    if is_hf_dir(path):
        return {"name": str(path.resolve()), "kind": "hf_dir"}
    if any(p.suffix.lower() == GGUF_SUFFIX for p in path.iterdir() if p.is_file()):
        return {"name": str(find_gguf(path)), "kind": "gguf"}  # exactly one, or find_gguf names them all
    raise SpecError(
        f"{path} is neither a Hugging Face model directory (config.json with a model_type) nor a native "
        "checkpoint (config.json + model.safetensors from reversion_lens.models.save_native), and holds no "
        ".gguf file."
    )


def as_spec(x: "str | os.PathLike | ModelSpec", **options: Any) -> ModelSpec:
    """Coerce anything that names a model to a validated :class:`ModelSpec` (alias of :func:`parse_spec`)."""
    return parse_spec(x, **options)


# ---------------------------------------------------------------------- histories
def check_compatible(specs: Mapping[str, ModelSpec]) -> None:
    """Raise :class:`IncompatibleCheckpointsError` if two specs' configs disagree (no weights loaded).

    Compares ``n_layers``, ``d_model``, ``d_vocab`` and the architecture of every spec whose config is
    readable now (local folders, cached hub models); the others are compared after loading by
    :meth:`reversion_lens.history.History.stats`.
    """
    known = [(n, s, s.signature()) for n, s in specs.items()]
    known = [(n, s, sig) for n, s, sig in known if sig is not None]
    for name, spec, sig in known[1:]:
        first_name, first_spec, first = known[0]
        diffs = [
            f"{k} {first[k]} vs {sig[k]}"
            for k in ("architecture", "n_layers", "d_model", "d_vocab")
            if first[k] != sig[k]
        ]
        if diffs:
            raise IncompatibleCheckpointsError(
                f"checkpoints {first_name!r} ({first_spec}) and {name!r} ({spec}) are not states of one model: "
                f"{', '.join(diffs)} (from their config.json). Compare checkpoints of the same architecture and "
                "tokenizer, e.g. a base model and its own chat / aligned fine-tune."
            )


def make_history(specs: Mapping[str, "str | os.PathLike | ModelSpec"], **options: Any) -> Any:
    """A :class:`reversion_lens.history.History` from ``{checkpoint name: spec}``, earliest first.

    Every spec is parsed and the configs compared before anything loads.
    """
    from .history import History

    parsed = {n: parse_spec(s, **options) for n, s in specs.items()}
    check_compatible(parsed)
    return History([s.checkpoint(n) for n, s in parsed.items()])
