"""Drift tracking during fine-tuning: how far, and which way, the probe activations have moved.

A :class:`DriftTracker` is a callback ``tracker(step, model)``: at each step it is called at, it
computes the probe-set means of the direction's layers with :func:`reversion_lens.residual_stats`
(inference mode, stopped after the last needed layer) and the per-layer metrics of
:func:`reversion_lens.drift.drift_metrics` against the reference (aligned) and base statistics. Rows
are tidy: ``step, layer, cos, projection, drift_norm, reversion_ratio``. It measures the bare weights:
the model is put in eval mode (no dropout) and attached interventions are paused for the measurement;
both are restored afterwards, and it adds no hooks that outlive the call.
"""

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from jaxtyping import Float
from torch import Tensor

from .activations import ResidStats, residual_stats
from .directions import Direction
from .drift import METRIC_COLUMNS, drift_metrics
from .errors import NonFiniteError, ResultsFormatError, ShapeError
from .hooks import eval_mode, paused
from .io import load_tensors, save_tensors
from .probes import ProbeSet

__all__ = ["DriftTracker", "TRACK_COLUMNS", "load_means"]

TRACK_COLUMNS = ("step", "layer", *METRIC_COLUMNS)


class DriftTracker:
    """Per-layer drift of the probe means, relative to ``reference``, compared with ``direction``.

    Args:
        probes: the probe prompts (the ones the direction was derived on, usually).
        direction: per-layer unit vectors; only its layers are read.
        reference: statistics (or ``[layer, d_model]`` means) of the reference (aligned) model.
        base: statistics (or means) of the base model: the reversion ratio's scale.
        site: where to read (default: the direction's site).
        keep_means: also keep each step's means ``[layer, d_model]`` (float32) in :attr:`means`.
        batch_size: prompts per forward pass.
        with_interventions: measure with attached interventions active (default: paused).
    """

    def __init__(
        self,
        probes: ProbeSet,
        direction: Direction,
        reference: ResidStats | Tensor,
        base: ResidStats | Tensor,
        *,
        site: str | None = None,
        keep_means: bool = False,
        batch_size: int = 32,
        with_interventions: bool = False,
    ):
        self.probes = probes
        self.direction = direction
        self.site = site or direction.site
        for what, stats in (("reference", reference), ("base", base)):
            if isinstance(stats, ResidStats) and stats.site != self.site:
                raise ShapeError(
                    f"{what} statistics are at site {stats.site!r} but the tracker reads {self.site!r}; "
                    "compute them at the same site."
                )
        self.reference, self.base = reference, base
        self.keep_means = keep_means
        self.batch_size = batch_size
        self.with_interventions = with_interventions
        self.records: list[dict[str, Any]] = []
        self.means: dict[int, Float[Tensor, "layer d_model"]] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        return self.direction.layers

    def __call__(self, step: int, model: Any) -> list[dict[str, Any]]:
        """The ``finetune`` callback form of :meth:`measure`."""
        return self.measure(step, model)

    def measure(self, step: int, model: Any) -> list[dict[str, Any]]:
        """Measure at ``step``; returns (and records) one row per layer. Re-measuring a step replaces its rows."""
        step = int(step)
        try:
            with eval_mode(model), nullcontext() if self.with_interventions else paused(model):
                stats = residual_stats(
                    model, self.probes, site=self.site, layers=self.layers, batch_size=self.batch_size
                )
            rows = drift_metrics(stats, self.reference, self.base, self.direction, step=step)
        except NonFiniteError as e:
            raise NonFiniteError(f"at fine-tuning step {step}: {e}") from e
        self.records = [r for r in self.records if r["step"] != step] + rows
        self.records.sort(key=lambda r: (r["step"], r["layer"]))
        if self.keep_means:
            self.means[step] = stats.mean.float()
        return rows

    def frame(self) -> Any:
        """The records as a ``pandas.DataFrame`` with columns :data:`TRACK_COLUMNS`."""
        import pandas as pd

        return pd.DataFrame(self.records, columns=list(TRACK_COLUMNS))

    def save_means(self, path: str | Path) -> Path:
        """Write the kept means as safetensors, one ``[layer, d_model]`` tensor per key ``step_<n>``."""
        if not self.keep_means:
            raise ShapeError("no means kept; build the tracker with keep_means=True.")
        meta = {"kind": "drift_means", "layers": list(self.layers), "site": self.site}
        return save_tensors(path, {f"step_{s}": m for s, m in sorted(self.means.items())}, meta)

    # -------------------------------------------------------------- resumability
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, json)``: the kept means and the records."""
        return {f"step_{s}": m for s, m in self.means.items()}, {"records": self.records}

    def load_state_dict(self, tensors: Mapping[str, Tensor], info: Mapping[str, Any]) -> None:
        self.records = [dict(r) for r in info.get("records", [])]
        self.means = {int(k.split("_", 1)[1]): v for k, v in tensors.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "probes": self.probes.hash(),
            "layers": list(self.layers),
            "site": self.site,
            "keep_means": self.keep_means,
            "with_interventions": self.with_interventions,
        }


def load_means(path: str | Path) -> dict[int, Float[Tensor, "layer d_model"]]:
    """Read a file written by :meth:`DriftTracker.save_means`: ``{step: means}``."""
    tensors, meta = load_tensors(path)
    if meta.get("kind") != "drift_means":
        raise ResultsFormatError(f"{path} does not hold drift means (written by DriftTracker.save_means).")
    return {int(k.split("_", 1)[1]): v for k, v in sorted(tensors.items(), key=lambda kv: int(kv[0].split("_", 1)[1]))}
