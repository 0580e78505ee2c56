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

__all__ = ["save_native", "load_native", "boot_native", "load_hf", "native_config", "hf_signature", "native_signature"]

NATIVE_CONFIG = "config.json"
NATIVE_WEIGHTS = "model.safetensors"


def native_config(model: Any) -> dict[str, Any]:
    """The JSON-able config of a native bridge (``dtype`` dropped: JSON cannot store it)."""
    return {k: v for k, v in model.cfg.to_dict().items() if k != "dtype"}


def boot_native(config: dict[str, Any], device: str | None = None, dtype: torch.dtype | None = None) -> Any:
    from transformer_lens import TransformerBridge

    return TransformerBridge.boot_native(dict(config), device=device, dtype=dtype)


def save_native(model: Any, folder: str | os.PathLike, config: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically (weights first, config last)."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_tensors(folder / NATIVE_WEIGHTS, state, {"kind": "native_weights"})
    atomic_write_text(folder / NATIVE_CONFIG, json.dumps(config or native_config(model), indent=2, default=str))
    return folder


def is_native_dir(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / NATIVE_WEIGHTS).exists() and (folder / NATIVE_CONFIG).exists() and not (
        folder / "tokenizer_config.json"
    ).exists() and "model_type" not in _read_config(folder)


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / NATIVE_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


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
    model = TransformerBridge.boot_native(config, tokenizer=tokenizer, device=device, dtype=dtype)
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
    **kwargs: Any,
) -> Any:
    """``TransformerBridge.boot_transformers`` with clear errors.

    A local directory never touches the network; a revision or checkpoint step for a local directory
    is an error (local folders have no checkpoints: use one folder per checkpoint).
    """
    from transformer_lens import TransformerBridge

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    local = Path(name_or_dir).exists()
    if local and (revision is not None or checkpoint_value is not None):
        raise SpecError(
            f"{name_or_dir} is a local directory; it has no revisions or checkpoint steps. Save each "
            "checkpoint to its own directory and name that directory instead."
        )
    kw: dict[str, Any] = {"device": device or "cpu", **kwargs}
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
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise SpecError(
            f"could not load {name_or_dir!r}"
            + (f" at revision {revision!r}" if revision else "")
            + (f" at step {checkpoint_value}" if checkpoint_value is not None else "")
            + f": {e}. "
            + ("HF_HUB_OFFLINE=1 is set, so only models already in the local cache load; " if offline else "")
            + "check the name, the revision or step, and your hub access, or pass a local directory."
        ) from e
