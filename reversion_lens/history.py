"""Checkpoints and histories: ordered, named model states, each loaded lazily.

Only one model is in memory at a time: :meth:`History.stats` loads a checkpoint, streams the probe set
through it and drops it before loading the next. All checkpoints of a history must agree on
``n_layers``, ``d_model`` and the vocabulary size; a mismatch is an
:class:`~reversion_lens.errors.IncompatibleCheckpointsError` naming both checkpoints.
"""

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .activations import ResidStats, residual_stats
from .directions import Direction, chain, mean_difference, principal_component
from .errors import IncompatibleCheckpointsError, ReversionLensError
from .models import hf_signature, load_hf, load_native, native_signature, release_memory
from .probes import ProbeSet
from .sites import model_signature

__all__ = ["Checkpoint", "History"]


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A named model state and how to load it. Use the class-method constructors."""

    name: str
    loader: Callable[[], Any] = field(repr=False)
    source: dict[str, Any] = field(default_factory=dict)
    signature_hint: dict[str, int] | None = field(default=None, repr=False)

    def load(self) -> Any:
        return self.loader()

    def signature(self) -> dict[str, int]:
        """n_layers / d_model / d_vocab, from the config where possible (no weights loaded)."""
        if self.signature_hint is not None:
            return self.signature_hint
        model = self.load()
        sig = model_signature(model)
        del model
        return sig

    @classmethod
    def native(cls, name: str, folder: str | os.PathLike, device: str | None = None) -> "Checkpoint":
        """A folder written by :func:`reversion_lens.models.save_native`."""
        import json

        folder = Path(folder)
        try:
            sig = native_signature(json.loads((folder / "config.json").read_text()))
        except (OSError, ValueError, KeyError):
            sig = None
        return cls(name, lambda: load_native(folder, device=device), {"kind": "native", "path": str(folder)}, sig)

    @classmethod
    def hf(
        cls,
        name: str,
        model: str,
        *,
        revision: str | None = None,
        checkpoint_value: int | None = None,
        device: str | None = None,
        dtype: Any = None,
    ) -> "Checkpoint":
        """A Hugging Face model: a local directory, or a hub name with a revision / Pythia step."""

        def loader() -> Any:
            return load_hf(model, revision=revision, checkpoint_value=checkpoint_value, device=device, dtype=dtype)

        src = {"kind": "hf", "model": model, "revision": revision, "checkpoint_value": checkpoint_value}
        sig = hf_signature(model) if Path(model).exists() else None
        return cls(name, loader, src, sig)

    @classmethod
    def in_memory(cls, name: str, model: Any) -> "Checkpoint":
        """A model already in memory (it stays referenced by the checkpoint)."""
        return cls(name, lambda: model, {"kind": "memory", "class": type(model).__name__}, model_signature(model))


class History:
    """An ordered list of named checkpoints, earliest first (e.g. ``base``, ``aligned``)."""

    def __init__(self, checkpoints: Sequence[Checkpoint]):
        if len(checkpoints) == 0:
            raise ReversionLensError("a history needs at least one checkpoint.")
        names = [c.name for c in checkpoints]
        if len(set(names)) != len(names):
            raise ReversionLensError(f"checkpoint names must be unique, got {names}.")
        self.checkpoints = list(checkpoints)
        known = [(c, c.signature_hint) for c in self.checkpoints if c.signature_hint is not None]
        for c, sig in known[1:]:
            _check_compatible(known[0][0].name, known[0][1], c.name, sig)

    def __getitem__(self, name: str) -> Checkpoint:
        for c in self.checkpoints:
            if c.name == name:
                return c
        raise KeyError(f"no checkpoint named {name!r}; this history has {self.names}.")

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __len__(self) -> int:
        return len(self.checkpoints)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.checkpoints]

    def load(self, name: str) -> Any:
        return self[name].load()

    def stats(
        self,
        probes: ProbeSet,
        names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, ResidStats]:
        """Residual statistics for each named checkpoint (all by default), one model in memory at a time.

        ``kwargs`` go to :func:`reversion_lens.residual_stats` (site, layers, batch_size, ...).
        """
        out: dict[str, ResidStats] = {}
        first: tuple[str, dict[str, int]] | None = None
        extra_meta = kwargs.pop("meta", {})  # popped once: every checkpoint's statistics get it
        for name in names or self.names:
            model = self.load(name)
            sig = model_signature(model)
            if first is None:
                first = (name, sig)
            else:
                _check_compatible(first[0], first[1], name, sig)
            meta = {"checkpoint": name, "source": self[name].source, **extra_meta}
            out[name] = residual_stats(model, probes, meta=meta, **kwargs)
            del model
            release_memory()  # the next checkpoint loads into the memory this one held
        return out

    def direction(
        self,
        probes: ProbeSet,
        base: str = "base",
        aligned: str = "aligned",
        method: str = "mean_difference",
        via: Sequence[str] = (),
        **kwargs: Any,
    ) -> Direction:
        """v_rev from ``base`` to ``aligned`` (``method``: mean_difference | principal_component | chain)."""
        if method == "principal_component":
            kwargs["keep_per_prompt"] = True
        names = [base, *via, aligned]
        st = self.stats(probes, names, **kwargs)
        if method == "mean_difference":
            return mean_difference(st[base], st[aligned])
        if method == "principal_component":
            return principal_component(st[base], st[aligned])
        if method == "chain":
            return chain([st[n] for n in names])
        raise ReversionLensError(f"unknown method {method!r}; use mean_difference, principal_component or chain.")


def _check_compatible(name_a: str, sig_a: dict[str, int], name_b: str, sig_b: dict[str, int]) -> None:
    diffs = [f"{k} {sig_a[k]} vs {sig_b[k]}" for k in ("n_layers", "d_model", "d_vocab") if sig_a[k] != sig_b[k]]
    if diffs:
        raise IncompatibleCheckpointsError(
            f"checkpoints {name_a!r} and {name_b!r} are not states of one model ({', '.join(diffs)}). "
            "A history compares checkpoints of the same architecture and tokenizer: check the model names / paths."
        )
