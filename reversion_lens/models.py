"""Loading and saving model states: native TransformerBridge checkpoints and Hugging Face models.

* **native**: a folder with ``config.json`` (a ``TransformerBridgeConfig`` as a dict) and
  ``model.safetensors`` (TL-keyed ``bridge.state_dict()``), written by :func:`save_native`.
* **Hugging Face**: a local directory (no network) or, for users with hub access, a hub name with a
  ``revision`` or a Pythia training step (``checkpoint_value``).

Only safetensors (or ``torch.load(weights_only=True)``) is ever read.
"""

import json
import os
from pathlib import Path
from typing import Any

import torch

from .errors import SpecError
from .io import atomic_write_text, load_tensors, save_tensors

__all__ = [
    "save_native",
    "load_native",
    "boot_native",
    "load_hf",
    "native_config",
    "hf_signature",
    "native_signature",
    "is_native_dir",
    "is_hf_dir",
    "dir_signature",
    "parse_dtype",
    "DTYPES",
]

NATIVE_CONFIG = "config.json"
NATIVE_WEIGHTS = "model.safetensors"
NATIVE_TOKENIZER = "tokenizer"  # sub-folder: a saved Hugging Face tokenizer, optional

#: dtype names accepted wherever a dtype is given as text (CLI flags, specs).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: "str | torch.dtype | None") -> torch.dtype | None:
    """``"bfloat16"``, ``"bf16"``, ``"torch.float16"``, a ``torch.dtype`` or ``None`` -> ``torch.dtype | None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise SpecError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}.")
    return DTYPES[key]


def native_config(model: Any) -> dict[str, Any]:
    """The JSON-able config of a native bridge (``dtype`` dropped: JSON cannot store it)."""
    return {k: v for k, v in model.cfg.to_dict().items() if k != "dtype"}


def boot_native(config: dict[str, Any], device: str | None = None, dtype: torch.dtype | None = None) -> Any:
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_native(dict(config), device=device, dtype=dtype)


def save_native(
    model: Any, folder: str | os.PathLike, config: dict[str, Any] | None = None, tokenizer: Any = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically (weights first, config last).

    A Hugging Face tokenizer (``tokenizer``, else ``model.tokenizer`` when it has one) is saved to the
    ``tokenizer/`` sub-folder, and :func:`load_native` attaches it again, so text probes work on native
    checkpoints too.
    """
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_tensors(folder / NATIVE_WEIGHTS, state, {"kind": "native_weights"})
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(folder / NATIVE_TOKENIZER)
    atomic_write_text(folder / NATIVE_CONFIG, json.dumps(config or native_config(model), indent=2, default=str))
    return folder


def is_native_dir(folder: str | os.PathLike) -> bool:
    """A folder written by :func:`save_native` (native config, no Hugging Face ``model_type``)."""
    folder = Path(folder)
    return (folder / NATIVE_WEIGHTS).exists() and (folder / NATIVE_CONFIG).exists() and not (
        folder / "tokenizer_config.json"
    ).exists() and "model_type" not in _read_config(folder)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / NATIVE_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_hf_dir(folder: str | os.PathLike) -> bool:
    """A local Hugging Face model folder: a ``config.json`` with a ``model_type``."""
    return Path(folder).is_dir() and "model_type" in _read_config(Path(folder))


def dir_signature(folder: str | os.PathLike) -> dict[str, Any] | None:
    """What two checkpoints of one model share, from the config alone (no weights loaded).

    ``{n_layers, d_model, d_vocab, architecture}`` for a native or Hugging Face folder; ``None`` when
    the config cannot be read. ``architecture`` is the HF ``model_type`` (``gpt2``, ``gpt_neox``, ...)
    or ``"native"``.
    """
    folder = Path(folder)
    if is_native_dir(folder):
        try:
            return {**native_signature(_read_config(folder)), "architecture": "native"}
        except (KeyError, TypeError, ValueError):
            return None
    sig = hf_signature(folder)
    if sig is None:
        return None
    return {**sig, "architecture": str(_read_config(folder).get("model_type"))}


def native_signature(config: dict[str, Any]) -> dict[str, int]:
    return {"n_layers": int(config["n_layers"]), "d_model": int(config["d_model"]), "d_vocab": int(config["d_vocab"])}


def load_native(
    folder: str | os.PathLike, device: str | None = None, dtype: torch.dtype | None = None, tokenizer: Any = None
) -> Any:
    """Load a folder written by :func:`save_native`."""
    from transformer_lens import TransformerBridge

    folder = Path(folder)
    if not (folder / NATIVE_CONFIG).exists() or not (folder / NATIVE_WEIGHTS).exists():
        raise SpecError(
            f"{folder} is not a native checkpoint: it needs {NATIVE_CONFIG} and {NATIVE_WEIGHTS} "
            "(written by reversion_lens.models.save_native)."
        )
    config = _read_config(folder)
    if tokenizer is None and (folder / NATIVE_TOKENIZER).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder / NATIVE_TOKENIZER)
    model = TransformerBridge.boot_native(config, tokenizer=tokenizer, device=device, dtype=parse_dtype(dtype))
    state, _ = load_tensors(folder / NATIVE_WEIGHTS)
    model.load_state_dict({k: v.to(device or "cpu") for k, v in state.items()})
    return model


def hf_signature(folder: str | os.PathLike) -> dict[str, int] | None:
    """n_layers / d_model / d_vocab read from a local HF ``config.json`` without loading weights."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return None
    c = json.loads(path.read_text())
    if "text_config" in c:
        c = {**c, **c["text_config"]}
    pick = lambda *keys: next((c[k] for k in keys if k in c), None)  # noqa: E731
    n_layers = pick("num_hidden_layers", "n_layer", "num_layers")
    d_model = pick("hidden_size", "n_embd", "d_model")
    vocab = pick("vocab_size")
    if None in (n_layers, d_model, vocab):
        return None
    return {"n_layers": int(n_layers), "d_model": int(d_model), "d_vocab": int(vocab)}


def load_hf(
    name_or_dir: str,
    *,
    revision: str | None = None,
    checkpoint_value: int | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    n_devices: int | None = None,
    device_map: str | dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``TransformerBridge.boot_transformers`` with clear errors.

    A local directory never touches the network; a revision or checkpoint step for a local directory
    is an error (local folders have no checkpoints: use one folder per checkpoint).

    Placement (TransformerLens 4.3 ``boot_transformers``): ``device`` (default ``"cpu"``) puts the whole
    model on one device; ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict of module
    name -> device) and ``n_devices`` (split over that many CUDA devices, translated by TL into
    ``device_map="balanced"`` plus a ``max_memory`` budget) dispatch it with accelerate. ``device_map``
    excludes ``device``; other keyword arguments (``max_memory``, ``n_ctx``, ``trust_remote_code``,
    ``tokenizer``, ``hf_model``, ...) go to ``boot_transformers`` unchanged.
    """
    from transformer_lens import TransformerBridge

    dtype = parse_dtype(dtype)
    local = Path(name_or_dir).exists()
    if local and (revision is not None or checkpoint_value is not None):
        raise SpecError(
            f"{name_or_dir} is a local directory; it has no revisions or checkpoint steps. Save each "
            "checkpoint to its own directory and name that directory instead."
        )
    if device_map is not None and device is not None:
        raise SpecError(f"both device={device!r} and device_map={device_map!r} given; pass one of them.")
    kw: dict[str, Any] = dict(kwargs)
    if device_map is not None:
        kw["device_map"] = device_map
    elif n_devices is not None and n_devices > 1:
        kw["n_devices"] = n_devices  # TL places the layers; cfg.device becomes the embedding's device
    else:
        kw["device"] = device or "cpu"
    if dtype is not None:
        kw["dtype"] = dtype
    if revision is not None:
        kw["revision"] = revision
    if checkpoint_value is not None:
        kw["checkpoint_value"] = checkpoint_value
    try:
        return TransformerBridge.boot_transformers(name_or_dir, **kw)
    except (OSError, ValueError) as e:
        if local:
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "TRUE", "YES", "ON")
        raise SpecError(
            f"could not load {name_or_dir!r}"
            + (f" at revision {revision!r}" if revision else "")
            + (f" at step {checkpoint_value}" if checkpoint_value is not None else "")
            + f": {e}. "
            + ("HF_HUB_OFFLINE=1 is set, so only models already in the local cache load; " if offline else "")
            + "check the name, the revision or step, and your hub access, or pass a local directory."
        ) from e
