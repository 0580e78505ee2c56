"""Atomic writes and safe loads: nothing a user produced is lost, nothing loaded runs code.

Every file goes to a temporary name in the same folder, is flushed and fsynced, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows). A reader therefore sees either the old
file or the new one, never a half-written one. Tensors are stored as safetensors; the only other
loader is ``torch.load(weights_only=True)``.
"""

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load_bytes
from safetensors.torch import save as _st_save_bytes

from .errors import ResultsFormatError, UnsafeLoadError

__all__ = [
    "FORMAT_VERSION",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "safe_torch_load",
    "environment",
    "config_hash",
    "FileLock",
]

#: Version of the on-disk results format. Bump when a reader could misread older files.
FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsFormatError(
            f"{path} is not valid JSON ({e}); it is corrupted or truncated. Delete it and rerun the step "
            "that writes it."
        ) from e


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save tensors as safetensors, atomically. ``metadata`` values are JSON-encoded strings."""
    meta = {"format_version": str(FORMAT_VERSION)}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, default=_json_default, sort_keys=True)
    data = _st_save_bytes({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, metadata=meta)
    return atomic_write_bytes(path, data)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors`: ``(tensors, metadata)``.

    A corrupted or truncated file, or one from a newer format version, is a
    :class:`ResultsFormatError` that says to delete and regenerate it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    try:
        tensors = _st_load_bytes(raw)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta_raw = f.metadata() or {}
    except (SafetensorError, Exception) as e:  # safetensors raises several types on bad headers
        if isinstance(e, ResultsFormatError):
            raise
        raise ResultsFormatError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}). It is corrupted or "
            "truncated: delete it and rerun the step that writes it."
        ) from e
    meta: dict[str, Any] = {}
    for k, v in meta_raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    version = int(meta.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise ResultsFormatError(
            f"{path} was written by results format {version}, newer than this reversion_lens "
            f"(format {FORMAT_VERSION}). Upgrade reversion_lens, or regenerate the file."
        )
    return tensors, meta


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers; a pickle that runs code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (a pickle.UnpicklingError) here
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "UnpicklingError" in type(e).__name__:
            raise UnsafeLoadError(
                f"Refusing to load {path}: it contains Python objects that would run code when unpickled "
                f"({e.__class__.__name__}). Convert it to safetensors from a trusted environment."
            ) from e
        raise


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Package versions, platform and git commit, recorded in every results folder."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("reversion_lens", "torch", "transformer-lens", "transformers", "numpy", "scipy", "safetensors"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {
        "format_version": FORMAT_VERSION,
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def config_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-able object (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class FileLock:
    """An exclusive advisory lock on ``path`` (``fcntl.flock``), so two processes never write one run.

    ``blocking=False`` raises :class:`BlockingIOError` when another process holds the lock. The lock
    is released by the kernel when the process dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, path: str | os.PathLike, blocking: bool = True):
        self.path = Path(path)
        self.blocking = blocking
        self._fd: int | None = None

    def __enter__(self) -> "FileLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None`` leaves it alone)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
