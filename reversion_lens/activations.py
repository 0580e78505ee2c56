"""Streaming residual-stream statistics over a probe set.

Forward hooks read each covered layer at the probe set's read positions and add into float64
accumulators: the sum, the count, optionally the sum of outer products (second moments) and optionally
the per-prompt vectors. Nothing else is kept, so memory is ``O(layers x d_model)`` (plus ``d_model^2``
per layer with second moments) whatever the number of prompts. The forward pass stops right after the
last layer needed: the unembedding, usually the largest matrix product, is never computed.
"""

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import NonFiniteError, ResultsFormatError, ShapeError
from .io import load_tensors, save_tensors
from .probes import ProbeSet
from .sites import check_layers, d_model, hook_name

__all__ = ["ResidStats", "residual_stats"]


class _StopForward(Exception):
    """Raised by the hook of the last needed layer, to skip the rest of the forward pass."""


@dataclass(frozen=True, eq=False)
class ResidStats:
    """Per-layer statistics of one model state on one probe set, at one site.

    ``sum`` and ``second`` are float64 accumulators; :attr:`mean` and :meth:`covariance` derive from them.
    ``per_prompt`` (float32, ``[prompt, layer, d_model]``) is present only when asked for.
    """

    sum: Float[Tensor, "layer d_model"]
    count: int
    layers: tuple[int, ...]
    site: str
    second: Float[Tensor, "layer d_model d_model"] | None = None
    per_prompt: Float[Tensor, "prompt layer d_model"] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sum.ndim != 2 or self.sum.shape[0] != len(self.layers):
            raise ShapeError(f"sum has shape {tuple(self.sum.shape)}, expected [{len(self.layers)}, d_model].")
        if self.count < 1:
            raise ShapeError("statistics over zero prompts; the probe set was empty.")
        # Nothing non-finite is ever held, hence ever saved or used (a loaded file is checked too).
        for what, x, layer_dim in (("sum", self.sum, 0), ("second moments", self.second, 0),
                                   ("per-prompt vectors", self.per_prompt, 1)):  # fmt: skip
            if x is not None:
                _finite_or_raise(x, f"residual statistics ({what}) at site {self.site}", self.layers, layer_dim)

    @property
    def mean(self) -> Float[Tensor, "layer d_model"]:
        return self.sum / self.count

    @property
    def d_model(self) -> int:
        return int(self.sum.shape[1])

    def covariance(self) -> Float[Tensor, "layer d_model d_model"]:
        """Covariance of the per-prompt vectors (ddof=1), from second moments or kept vectors."""
        if self.second is not None:
            if self.count < 2:
                raise ShapeError("a covariance needs at least 2 prompts.")
            m = self.mean
            return (self.second - self.count * m[:, :, None] * m[:, None, :]) / (self.count - 1)
        if self.per_prompt is not None:
            x = self.per_prompt.double().transpose(0, 1)  # [layer, prompt, d]
            xc = x - x.mean(1, keepdim=True)
            return xc.transpose(1, 2) @ xc / (x.shape[1] - 1)
        raise ShapeError("no second moments kept; compute with residual_stats(..., second_moments=True).")

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ShapeError(f"layer {layer} is not covered; these statistics cover layers {self.layers}.") from None

    def save(self, path: str | Path) -> Path:
        tensors = {"sum": self.sum, "mean": self.mean.float()}
        if self.second is not None:
            tensors["second"] = self.second
        if self.per_prompt is not None:
            tensors["per_prompt"] = self.per_prompt
        meta = {"kind": "resid_stats", "count": self.count, "layers": list(self.layers), "site": self.site}
        meta["meta"] = self.meta
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "ResidStats":
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "resid_stats" or "sum" not in tensors:
            raise ResultsFormatError(f"{path} does not hold residual statistics (written by ResidStats.save).")
        return cls(
            sum=tensors["sum"],
            count=int(meta["count"]),
            layers=tuple(meta["layers"]),
            site=meta["site"],
            second=tensors.get("second"),
            per_prompt=tensors.get("per_prompt"),
            meta=meta.get("meta", {}),
        )


def _clear_attention_cache(model: torch.nn.Module) -> None:
    # TL4 attention bridges keep the last pattern alive (PERFORMANCE.md); leave memory as we found it.
    for mod in model.modules():
        if getattr(mod, "_pattern", None) is not None:
            with contextlib.suppress(AttributeError, TypeError):
                mod._pattern = None


@torch.inference_mode()
def residual_stats(
    model: Any,
    probes: ProbeSet,
    *,
    site: str = "resid_post",
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    second_moments: bool = False,
    keep_per_prompt: bool = False,
    meta: dict[str, Any] | None = None,
) -> ResidStats:
    """Stream ``model`` over ``probes`` and return per-layer statistics at ``site``.

    Args:
        model: a TransformerLens model (``TransformerBridge`` or legacy ``HookedTransformer``).
        probes: the prompts; token ids are checked against the model's vocabulary.
        site: one of :data:`reversion_lens.sites.SITES`.
        layers: layers to read (``None`` = all). The pass stops after the last of them.
        batch_size: prompts per forward pass.
        second_moments: also accumulate ``sum x x^T`` per layer (for covariances / matched nulls).
        keep_per_prompt: also keep each prompt's vector (``[prompt, layer, d_model]``, float32).
        meta: extra provenance stored with the statistics (model name, checkpoint, ...).

    Returns:
        :class:`ResidStats` with float64 sums. Raises :class:`NonFiniteError` naming the layer and
        batch on NaN/inf activations; nothing non-finite is returned.
    """
    layers_t = check_layers(model, layers)
    names = {hook_name(model, site, layer): i for i, layer in enumerate(layers_t)}
    last_name = hook_name(model, site, layers_t[-1])
    probes.check_vocab(int(model.cfg.d_vocab))
    D = d_model(model)
    L = len(layers_t)
    total = torch.zeros(L, D, dtype=torch.float64)
    second = torch.zeros(L, D, D, dtype=torch.float64) if second_moments else None
    per_prompt = torch.zeros(len(probes), L, D, dtype=torch.float32) if keep_per_prompt else None
    state: dict[str, Any] = {}

    def read(act: Tensor, hook: Any) -> None:
        name = hook.name if hook.name in names else _alias(hook)
        i = names[name]
        w = state["weights"].to(act.device, act.dtype)
        vec = torch.einsum("bpd,bp->bd", act, w).double().cpu()  # [batch, d_model]
        if not torch.isfinite(vec).all():
            raise NonFiniteError(
                f"non-finite activations at layer {layers_t[i]} ({site}) in probe batch {state['batch']} "
                f"(prompts {_rows(state['index'])}); check the checkpoint's weights and "
                "the dtype (bfloat16/float16 overflow?). No statistics were written."
            )
        total[i] += vec.sum(0)
        if second is not None:
            second[i] += vec.T @ vec
        if per_prompt is not None:
            per_prompt[state["index"], i] = vec.float()
        if name == last_name:
            raise _StopForward

    # TL4 calls a hook with its canonical name (blocks.0.hook_out) whichever alias was registered.
    aliases = {}
    for name in names:
        hp = model.hook_dict[name]
        aliases[getattr(hp, "name", name)] = name

    def _alias(hook: Any) -> str:
        return aliases[hook.name]

    fwd_hooks = [(name, read) for name in names]
    device = _device(model)
    try:
        with model.hooks(fwd_hooks=fwd_hooks):
            for b, batch in enumerate(probes.batches(batch_size)):
                state.update(weights=batch.weights, index=batch.index.tolist(), batch=b)
                try:
                    model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device))
                except _StopForward:
                    pass
    finally:
        _clear_attention_cache(model)
    info = dict(meta or {})
    info.setdefault("probes", probes.describe())
    return ResidStats(total, len(probes), layers_t, site, second, per_prompt, info)


def _rows(index: list[int]) -> str:
    """A batch's probe-set rows for a message (grouped by length, they need not be consecutive)."""
    shown = ", ".join(map(str, index[:8]))
    return shown + (f", ... ({len(index)} prompts)" if len(index) > 8 else "")


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _finite_or_raise(x: Tensor, what: str, layers: Sequence[int], layer_dim: int = 0) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).transpose(0, layer_dim).reshape(x.shape[layer_dim], -1).any(1)
        where = [layers[i] for i in bad.nonzero().flatten().tolist()]
        raise NonFiniteError(
            f"{what} contain NaN or inf at layer(s) {where}; they cannot be used or saved. Recompute them from "
            "a model whose activations are finite (check the checkpoint's weights and the dtype)."
        )
