"""Atomic writes and safe loads: nothing a user produced is lost, nothing loaded runs code.

Every file goes to a temporary name in the same folder, is flushed and fsynced, then renamed over
the target (``os.replace`` is atomic on POSIX and Windows). A reader therefore sees either the old
file or the new one, never a half-written one. Tensors are stored as safetensors; the only other
loader is ``torch.load(weights_only=True)``.
"""

import contextlib
import csv
import hashlib
import io
import json
import os
import pickle
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
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
    "write_csv",
    "torch_threads",
    "default_cache_dir",
]

_UMASK = os.umask(0)
os.umask(_UMASK)

#: Version of the on-disk results format. Bump when a reader could misread older files.
FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *more: bytes | memoryview) -> Path:
    """Write ``data`` (then each of ``more``) to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are ordinary files (0644 under umask 022)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in (data, *more):
                f.write(chunk)
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


def _content_hash(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, and the metadata (sorted by name)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Save tensors as safetensors, atomically. ``metadata`` values are JSON-encoded strings.

    The metadata also records ``format_version`` and a ``sha256`` of the tensors and the metadata, which
    :func:`load_tensors` checks: a flipped bit is an error, not a wrong number.

    The file is streamed from the tensors' own memory (no serialised copy of the whole file is built: a
    model's optimizer state is twice its weights), in the byte layout ``safetensors.torch.save`` gives,
    with the metadata sorted so the same tensors and metadata always give the same bytes.
    """
    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    meta = {"format_version": str(FORMAT_VERSION)}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, default=_json_default, sort_keys=True)
    meta["sha256"] = _content_hash(tensors, meta)
    head, order = _st_header(tensors, meta)
    chunks = [_raw_bytes(tensors[k]) for k in order]
    return atomic_write_bytes(path, head, *chunks)


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _st_header(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """The safetensors header (8-byte length + JSON, 8-byte aligned) and the tensors' order in the data.

    safetensors decides the order (by dtype, then name) and the dtype names: it serialises empty stand-ins
    of the same names and dtypes (and checks the real tensors as it would before saving them, e.g. for
    shared memory); the offsets come from the real sizes.
    """
    with contextlib.suppress(ImportError):
        from safetensors.torch import _evaluate_tensors_for_save

        _evaluate_tensors_for_save(dict(tensors))
    stand_ins = {k: torch.empty(0, dtype=t.dtype) for k, t in tensors.items()}
    raw = _st_save_bytes(stand_ins, metadata=dict(meta))
    n = int.from_bytes(raw[:8], "little")
    layout = json.loads(raw[8 : 8 + n])
    order = [k for k in layout if k != "__metadata__"]
    header: dict[str, Any] = {"__metadata__": dict(sorted(layout.get("__metadata__", {}).items()))}
    offset = 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": layout[k]["dtype"], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    return len(head).to_bytes(8, "little") + head, order


def _corrupted(path: Path, why: str) -> ResultsFormatError:
    return ResultsFormatError(
        f"{path} is not a readable safetensors file ({why}). It is corrupted or truncated: delete it and rerun "
        "the step that writes it."
    )


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors`: ``(tensors, metadata)``.

    The file is read once (tensors and metadata come from the same bytes, even if the file is replaced
    meanwhile). A corrupted or truncated file, one whose contents do not match its recorded
    ``sha256``, or one from a newer format version, is a :class:`ResultsFormatError` that says to
    delete and regenerate it (or to upgrade).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        tensors, meta_raw = _st_read(path)
    except Exception as e:  # json, struct and our own checks raise several types on bad bytes
        raise _corrupted(path, f"{type(e).__name__}: {e}") from e
    if "sha256" in meta_raw and meta_raw["sha256"] != _content_hash(tensors, meta_raw):
        raise _corrupted(path, "its contents do not match the sha256 recorded when it was written")
    meta: dict[str, Any] = {}
    for k, v in meta_raw.items():
        try:
            meta[k] = v if k == "sha256" else json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    try:
        version = int(meta.get("format_version", FORMAT_VERSION))
    except (TypeError, ValueError):
        raise _corrupted(path, f"format_version {meta.get('format_version')!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise ResultsFormatError(
            f"{path} was written by results format {version}, newer than this reversion_lens "
            f"(format {FORMAT_VERSION}). Upgrade reversion_lens, or regenerate the file."
        )
    return tensors, meta


# safetensors' dtype names (its format spec) -> the torch dtypes this torch has.
_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
             "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
             "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64"}  # fmt: skip
_ST_DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _ST_NAMES.items() if hasattr(torch, v)}


def _st_read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file into fresh tensors, each straight from the file (one open file: a file
    replaced meanwhile is read whole, old or new; no copy of the file is held), checking the layout as
    safetensors does: a JSON header, known dtypes, offsets that tile the data exactly."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        if len(first) < 8:
            raise ValueError(f"{len(first)} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(first, "little")
        if 8 + n > size:
            raise ValueError(f"the header claims {n} bytes but the file has {size - 8} after the length")
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a table")
        meta_raw = header.pop("__metadata__", None) or {}
        if not isinstance(meta_raw, dict) or not all(isinstance(v, str) for v in meta_raw.values()):
            raise ValueError("__metadata__ is not a table of strings")
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if isinstance(kv[1], dict) else -1)
        tensors: dict[str, torch.Tensor] = {}
        offset = 0
        for name, info in entries:
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise ValueError(f"tensor {name!r}: malformed entry {info!r}")
            dtype = _ST_DTYPES.get(info["dtype"])
            shape, (start, stop) = info["shape"], info["data_offsets"]
            if dtype is None:
                raise ValueError(f"tensor {name!r}: unknown dtype {info['dtype']!r}")
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"tensor {name!r}: bad shape {shape!r}")
            t = torch.empty(shape, dtype=dtype)
            if start != offset or stop - start != t.numel() * t.element_size():
                raise ValueError(f"tensor {name!r}: data offsets {[start, stop]} do not tile the data")
            if t.numel() and f.readinto(_raw_bytes(t)) != stop - start:
                raise ValueError(f"tensor {name!r}: the file ends inside its data")
            tensors[name] = t
            offset = stop
        if 8 + n + offset != size:
            raise ValueError(f"the data is {size - 8 - n} bytes, the header describes {offset}")
    return tensors, meta_raw


def _refusal_reason(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "unsupported" in ln.lower():
            return ln
    return lines[0] if lines else type(e).__name__


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only; nothing in the file runs.

    A pickle that names any other Python object (which a full unpickle would import and call) is an
    :class:`UnsafeLoadError`; an unreadable archive is a :class:`ResultsFormatError`.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:  # the weights-only unpickler refused something
        raise UnsafeLoadError(
            f"Refusing to load {path}: it is not a tensors-only file, and unpickling it fully could run "
            f"arbitrary code (torch.load(weights_only=True) stopped at: {_refusal_reason(e)}). If you trust "
            "its source, convert it to safetensors there (safetensors.torch.save_file); otherwise discard it."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ResultsFormatError(
            f"{path} is not a readable torch file ({type(e).__name__}: {_refusal_reason(e)}). It is corrupted "
            "or truncated: fetch or write it again."
        ) from e


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the repository this package's source is tracked in; ``(None, None)``
    when it is not (an installed wheel, or a site-packages that happens to sit inside another repo)."""
    if _git("ls-files", "--error-unmatch", Path(__file__).name) is None:
        return None, None
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    status = _git("status", "--porcelain", "--", ".")
    return commit, (None if status is None else bool(status.strip()))


def default_cache_dir() -> Path:
    """Where histories are cached: ``$REVERSION_LENS_CACHE``, else ``~/.cache/reversion_lens``."""
    env = os.environ.get("REVERSION_LENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "reversion_lens"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Package versions, platform and git state, recorded in every results folder.

    ``git_commit`` is the commit of the checkout this package was imported from (``None`` when it is not
    a git checkout); ``git_dirty`` is true when the package's source differs from that commit (modified
    or untracked files), so the commit alone does not reproduce the run.
    """
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("reversion_lens", "torch", "transformer-lens", "transformers", "numpy", "scipy", "pandas",
                "safetensors"):  # fmt: skip
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    commit, dirty = _git_state()
    return {
        "format_version": FORMAT_VERSION,
        "versions": versions,
        "cpu": _cpu_name(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """A CSV with a header row, written atomically: ``columns`` in order (other keys ignored), ``None``
    and NaN as empty cells (what ``pandas.read_csv`` reads back as NaN), floats with full precision."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_cell(r.get(k)) for k in columns})
    return atomic_write_text(path, buf.getvalue())


def _csv_cell(x: Any) -> Any:
    if x is None or (isinstance(x, float) and x != x):
        return ""
    return repr(float(x)) if isinstance(x, float) else x


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
