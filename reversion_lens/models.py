"""Loading and saving model states: native TransformerBridge checkpoints and Hugging Face models.

* **native**: a folder with ``config.json`` (a ``TransformerBridgeConfig`` as a dict) and
  ``model.safetensors`` (TL-keyed ``bridge.state_dict()``), written by :func:`save_native`.
* **Hugging Face**: a local directory (no network) or, for users with hub access, a hub name with a
  ``revision`` or a Pythia training step (``checkpoint_value``).
* **GGUF**: a ``.gguf`` file (llama.cpp's format), loaded through ``transformers`` (which needs the ``gguf``
  package) and dequantized to float, then booted like any Hugging Face model (:func:`load_gguf`).
  Export a fine-tuned model with :func:`reversion_lens.hf_export.save_hf`.

Only safetensors (or ``torch.load(weights_only=True)``) is ever read.
"""

import functools
import gc
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
    "load_gguf",
    "find_gguf",
    "gguf_signature",
    "require_gguf",
    "native_config",
    "hf_signature",
    "native_signature",
    "is_native_dir",
    "is_hf_dir",
    "dir_signature",
    "parse_dtype",
    "release_memory",
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


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``; elsewhere a no-op).

    Call it after dropping a model: glibc keeps freed memory in its arenas, so without it a process that
    streams checkpoints one at a time holds the last one's leftovers while it loads the next.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def hf_module_name(path: str) -> str:
    """The Hugging Face name of a bridge's module or parameter path (``_original_component`` segments dropped)."""
    return path.replace("._original_component", "").removeprefix("_original_component.")


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
    return (
        (folder / NATIVE_WEIGHTS).exists()
        and (folder / NATIVE_CONFIG).exists()
        and not (folder / "tokenizer_config.json").exists()
        and "model_type" not in _read_config(folder)
    )


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
    pick = lambda *keys: next((c[k] for k in keys if k in c), None)
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


# ---------------------------------------------------------------------- GGUF
GGUF_SUFFIX = ".gguf"


def require_gguf() -> None:
    """Raise :class:`SpecError` unless the ``gguf`` package (needed to read GGUF files) is installed."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise SpecError("GGUF models need the gguf package (transformers reads GGUF with it): pip install gguf") from e


def find_gguf(path: str | os.PathLike) -> Path:
    """The ``.gguf`` file that ``path`` names: the file itself, or the only ``.gguf`` file in a folder.

    Raises :class:`SpecError` for a missing path, a file that is not ``.gguf``, or a folder holding none or
    several (naming them).
    """
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix.lower() != GGUF_SUFFIX:
            raise SpecError(f"{path} is not a .gguf file; a GGUF spec names a .gguf file or a folder holding one.")
        return path.resolve()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == GGUF_SUFFIX)
        if len(found) == 1:
            return found[0].resolve()
        if not found:
            raise SpecError(f"{path} holds no .gguf file; name the .gguf file itself (gguf:PATH/TO/model.gguf).")
        raise SpecError(
            f"{path} holds {len(found)} .gguf files ({', '.join(p.name for p in found)}); name one of them: "
            f"gguf:{path / found[0].name}"
        )
    raise SpecError(f"{path} does not exist; a GGUF spec names a .gguf file or a folder holding exactly one.")


def gguf_signature(path: str | os.PathLike) -> dict[str, Any] | None:
    """``{n_layers, d_model, d_vocab, architecture}`` from a GGUF file's metadata (no weights read).

    ``architecture`` is GGUF's ``general.architecture`` (``llama`` for the Llama family, as Hugging Face's
    ``model_type``). ``None`` when the metadata lacks a field. Reads only the header's key-value section and
    stops once it has what it needs (milliseconds; ``gguf.GGUFReader`` parses the whole file's metadata,
    9-11 s for SmolLM2-135M here).
    """
    file = find_gguf(path)
    st = file.stat()
    return _gguf_signature(str(file), st.st_mtime_ns, st.st_size)


# GGUF value types -> struct format (strings and arrays are handled apart); see the GGUF spec (ggml docs/gguf.md).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


@functools.lru_cache(maxsize=16)
def _gguf_signature(file: str, mtime_ns: int, size: int) -> dict[str, Any] | None:
    import struct

    def read(f: Any, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        return struct.unpack(fmt, data)[0]

    def skip_value(f: Any, vtype: int) -> None:
        if vtype in _GGUF_SCALARS:
            f.seek(struct.calcsize("<" + _GGUF_SCALARS[vtype]), 1)
        elif vtype == _GGUF_STRING:
            f.seek(read(f, "<Q"), 1)
        elif vtype == _GGUF_ARRAY:
            etype, count = read(f, "<I"), read(f, "<Q")
            if etype in _GGUF_SCALARS:
                f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[etype]), 1)
            else:
                for _ in range(count):
                    skip_value(f, etype)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    meta: dict[str, Any] = {}
    try:
        with open(file, "rb") as f:
            if f.read(4) != b"GGUF" or read(f, "<I") not in (2, 3):
                raise ValueError("not a little-endian GGUF v2/v3 file")
            read(f, "<Q")  # tensor count
            for _ in range(read(f, "<Q")):
                key = f.read(read(f, "<Q")).decode("utf-8", "replace")
                vtype = read(f, "<I")
                if vtype in _GGUF_SCALARS:
                    meta[key] = read(f, "<" + _GGUF_SCALARS[vtype])
                elif vtype == _GGUF_STRING:
                    meta[key] = f.read(read(f, "<Q")).decode("utf-8", "replace")
                elif vtype == _GGUF_ARRAY and key == "tokenizer.ggml.tokens":
                    pos = f.tell()
                    f.seek(4, 1)
                    meta[key] = read(f, "<Q")  # the token count is the vocabulary size
                    f.seek(pos)
                    skip_value(f, vtype)
                else:
                    skip_value(f, vtype)
                arch = meta.get("general.architecture")
                if arch and all(f"{arch}.{k}" in meta for k in ("block_count", "embedding_length", "vocab_size")):
                    break
    except (EOFError, ValueError, struct.error) as e:
        raise SpecError(f"{file} is not a readable GGUF file ({e}).") from e
    arch = meta.get("general.architecture")
    if arch is None:
        return None
    n_layers, d_model = meta.get(f"{arch}.block_count"), meta.get(f"{arch}.embedding_length")
    vocab = meta.get(f"{arch}.vocab_size", meta.get("tokenizer.ggml.tokens"))
    if None in (n_layers, d_model, vocab):
        return None
    return {"n_layers": int(n_layers), "d_model": int(d_model), "d_vocab": int(vocab), "architecture": str(arch)}


def load_gguf(
    path: str | os.PathLike, *, device: str | None = None, dtype: torch.dtype | str | None = None, **kwargs: Any
) -> Any:
    """A ``TransformerBridge`` over a GGUF model: ``transformers`` loads and dequantizes it, the bridge boots on it.

    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` and ``AutoTokenizer.from_pretrained(folder,
    gguf_file=name)`` (no network), then ``TransformerBridge.boot_transformers(path, hf_model=..., tokenizer=...)``.
    Quantization noise is part of the weights; the model is float (``dtype``, default float32) on ``device``.

    Args:
        path: a ``.gguf`` file, or a folder holding exactly one.
        device: one device (default ``"cpu"``).
        dtype: the float dtype of the dequantized weights.
        kwargs: further ``boot_transformers`` keywords (``n_ctx``, ...).

    Returns:
        The bridge (eval mode); ``cfg.model_name`` is the ``.gguf`` file's path.
    """
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = find_gguf(path)
    require_gguf()
    dtype = parse_dtype(dtype) or torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        hf = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    except (ValueError, OSError, KeyError, NotImplementedError) as e:
        raise SpecError(
            f"transformers could not load {file} ({type(e).__name__}: {e}). GGUF support covers the architectures "
            "transformers lists for gguf_file (llama, mistral, qwen2, gemma, ...); convert other models to a Hugging "
            "Face folder first."
        ) from e
    hf = hf.to(device or "cpu").eval()
    return TransformerBridge.boot_transformers(
        str(file), hf_model=hf, tokenizer=tokenizer, device=device or "cpu", dtype=dtype, **kwargs
    )
