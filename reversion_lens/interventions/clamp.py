"""``clamp``: a forward hook at the direction's site pins each activation's ``v`` component, at every
position, to a reference component ``c``: ``h' = h + (c - h.v) v``. Two references:

* per input (``reference_model=``, use this for training): ``c = c_ref(x)``, the component that a
  separate, frozen copy of the reference (aligned) model has at the same site, layer and position on
  the *same* input. A forward pre-hook on the model captures each call's arguments (tokens,
  ``attention_mask``, ...) and runs the reference on them (eval mode, no grad, stopped after the last
  clamped layer); hooks on the reference read ``h_ref.v`` as ``[batch, pos]``. Guarantees
  ``h'.v = h_ref(x).v`` at every position of every clamped site (to float rounding), and a zero
  ``v`` gradient there; the reference's weights are never touched. Costs one no-grad reference forward
  (up to the last clamped layer) per forward of the model while the clamp is active, and the memory of
  a second model. Only forwards through ``model(...)`` are captured: ``TransformerBridge.run_with_cache``
  / ``run_with_hooks`` call ``model.forward`` directly and the clamp then raises
  :class:`~reversion_lens.errors.ConfigError` (it never reuses another input's components); so do
  incremental decoding with a KV cache and ``start_at_layer``. Paused (:func:`paused`): no reference
  forward and no clamp.
* mean (``reference=``): one scalar per layer, the reference's mean component at the probe read
  position (:class:`~reversion_lens.ResidStats` at the same site, a ``[layer, d_model]`` mean, or
  per-layer scalars). Guarantees ``h.v = c`` everywhere; cheap (no extra forward). But positions other
  than the read position naturally have very different components, so this rewrites the forward pass
  far from anything the model computes: in the toy world, fine-tuning through it left the bare weights
  95% harmful (40% with no block). For inference-time probing only.

Neither makes the weights stop moving along ``v`` (remove the clamp and the drift is there); the
components orthogonal to ``v`` move freely.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..directions import Direction
from ..errors import ConfigError, ShapeError
from ..hooks import Cast, EarlyStop, add_hook, eval_mode
from ..registry import MODES
from ..sites import all_modules, hook_name
from .base import Intervention, _check_forward_site, _components, _reference_rows

__all__ = ["Clamp"]


def _storages(model: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters() if p.numel()}


def _check_reference_model(model: Any, reference_model: Any, direction: Direction) -> None:
    """A per-input clamp's reference must be a separate model of the same shape, on the same device."""
    if reference_model is model:
        raise ConfigError(
            "reference_model is the model being clamped; pass a separate frozen copy of the reference "
            "(aligned) model, e.g. load its checkpoint a second time or copy.deepcopy(model) before training."
        )
    if not isinstance(reference_model, torch.nn.Module) or not hasattr(reference_model, "hook_dict"):
        raise ConfigError(
            f"reference_model must be a TransformerLens model (with hook points), got {type(reference_model).__name__}."
        )
    direction.check_model(reference_model)
    for field in ("d_model", "n_layers", "d_vocab"):
        a, b = getattr(model.cfg, field, None), getattr(reference_model.cfg, field, None)
        if a is not None and b is not None and int(a) != int(b):
            raise ConfigError(f"reference_model has {field}={b} but the model has {a}; use a copy of the same model.")
    shared = _storages(model) & _storages(reference_model)
    if shared:
        raise ConfigError(
            f"reference_model shares {len(shared)} parameter tensor(s) with the model, so training would move the "
            "reference too; pass an independent copy (load the checkpoint again, or copy.deepcopy(model))."
        )
    dev = next(model.parameters()).device
    ref_dev = next(reference_model.parameters()).device
    if dev != ref_dev:
        raise ConfigError(
            f"reference_model is on {ref_dev} but the model is on {dev}; move it with reference_model.to({str(dev)!r})."
        )


class Clamp(Intervention):
    """``clamp``: pin each activation's ``v`` component at the direction's site to a reference component.

    Args:
        model: the model to clamp.
        direction: unit vectors; the clamp acts at ``direction.site``.
        layers: a subset of ``direction.layers`` (``None``: all).
        reference_model: per input (for training): a separate, frozen copy of the reference model. Every
            position is pinned to that model's component on the same input. Never updated.
        reference: mean: :class:`~reversion_lens.ResidStats`, ``[layer, d_model]`` means or ``[layer]``
            scalars; every position is pinned to one scalar per layer. Give exactly one of the two.
    """

    mode = "clamp"

    def __init__(self, model: Any, direction: Direction, layers: Sequence[int] | int | None = None, *,
                 reference: Any = None, reference_model: Any = None):  # fmt: skip
        super().__init__(model, direction, layers)
        site = self.direction.site
        _check_forward_site(model, site)
        if (reference is None) == (reference_model is None):
            raise ConfigError(
                f"clamp got {'both' if reference is not None else 'neither'} of reference_model= and reference=; give "
                "reference_model= (a frozen copy of the aligned model: each position pinned to its component on the "
                "same input) or reference= (ResidStats, means or scalars: every position pinned to one mean component)."
            )
        self.reference_model = reference_model
        self.components: Float[Tensor, " layer"] | None = None
        if reference_model is not None:
            _check_reference_model(model, reference_model, self.direction)
            _check_forward_site(reference_model, site)
        else:
            rows = _reference_rows(reference, direction, self.layers, site)
            self.components = _components(rows, self.direction)
        self._targets: list[Tensor | None] | None = None  # this forward's reference components, one per layer
        self._sink: list[Tensor | None] | None = None  # filled by the reference's hooks while it runs
        self._ref_modules: list[torch.nn.Module] = []
        self._stop = EarlyStop()

    @property
    def per_input(self) -> bool:
        """Whether each position is pinned to the reference model's component on the same input."""
        return self.reference_model is not None

    # -------------------------------------------------------------- hooks on the model
    def _hook_specs(self) -> list[tuple[str, str, Callable]]:
        out = []
        for i, layer in enumerate(self.layers):
            name = hook_name(self.model, self.direction.site, layer)
            c = None if self.per_input else float(self.components[i])
            out.append((name, "fwd", self._make_hook(i, self.direction[layer], c)))
        return out

    def _make_hook(self, i: int, v: Tensor, c: float | None) -> Callable:
        vc = Cast(v)

        def clamp(x: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor | None:
            if self._paused:
                return None
            u = vc.like(x)
            target = c if c is not None else self._target(i, x)
            return x + (target - x @ u)[..., None] * u

        return clamp

    def _target(self, i: int, x: Tensor) -> Float[Tensor, "batch pos"]:
        layer = self.layers[i]
        if self._targets is None:
            raise ConfigError(
                f"the per-input clamp at layer {layer} ran in a forward pass whose input it did not capture. It "
                "captures calls to model(...); TransformerBridge.run_with_cache / run_with_hooks call model.forward "
                "directly. Register hooks with `with model.hooks(fwd_hooks=...)` and call model(...) instead."
            )
        t = self._targets[i]
        if t is None:
            raise ConfigError(f"the reference forward did not reach layer {layer}; the clamp has no component there.")
        if t.shape != x.shape[:-1]:
            raise ShapeError(
                f"reference components {tuple(t.shape)} do not match activations {tuple(x.shape)} at layer {layer}."
            )
        return t.to(x.dtype)

    # -------------------------------------------------------------- the reference forward
    def _on_attach(self) -> None:
        if not self.per_input:
            return
        ref, site = self.reference_model, self.direction.site
        last = max(range(len(self.layers)), key=lambda i: self.layers[i])
        for i, layer in enumerate(self.layers):
            name = hook_name(ref, site, layer)
            hp = ref.hook_dict[name]
            self._keep(
                hp, "fwd", add_hook(ref, hp, name, self._make_reader(i, self.direction[layer], i == last), "fwd")
            )
        self._keep(None, "module", self.model.register_forward_pre_hook(self._capture, with_kwargs=True))
        self._keep(None, "module", self.model.register_forward_hook(self._release, always_call=True))
        self._ref_modules = all_modules(ref)

    def _on_remove(self) -> None:
        self._targets = self._sink = None
        self._ref_modules = []

    def _make_reader(self, i: int, v: Tensor, stop: bool) -> Callable:
        vc = Cast(v)

        def read(x: Float[Tensor, "batch pos d_model"], hook: Any) -> None:
            if self._sink is None:  # the reference used on its own, outside the clamp's forward: inert
                return None
            self._sink[i] = (x @ vc.like(x)).detach()
            if stop:
                self._stop.stop()
            return None

        return read

    def _capture(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        self._targets = None
        if self._paused:
            return None
        for key in ("past_key_values", "past_kv_cache", "use_past_kv_cache", "start_at_layer"):
            if kwargs.get(key) not in (None, False):
                raise ConfigError(
                    f"the per-input clamp runs the reference on each call's full input; {key}= is not supported "
                    "(re-run the full sequence, as reversion_lens.generation does, or pause the clamp)."
                )
        self._targets = self._reference_components(args, kwargs)
        return None

    def _release(self, *_: Any) -> None:
        self._targets = None

    def _reference_components(self, args: tuple, kwargs: dict[str, Any]) -> list[Tensor | None]:
        """``h_ref.v`` ``[batch, pos]`` per clamped layer: the reference on the same arguments, eval mode, no grad."""
        sink: list[Tensor | None] = [None] * len(self.layers)
        self._sink = sink
        try:
            with eval_mode(self.reference_model, self._ref_modules), torch.no_grad():
                self._stop.run(self.reference_model, *args, **kwargs)
        finally:
            self._sink = None
        return sink

    def _options(self) -> dict[str, Any]:
        if self.per_input:
            ref = self.reference_model
            return {"reference": "per-input", "reference_model": type(ref).__name__,
                    "reference_cfg": {k: getattr(ref.cfg, k, None) for k in ("n_layers", "d_model", "d_vocab")}}  # fmt: skip
        return {"components": self.components.tolist()}


MODES.register(
    "clamp",
    Clamp,
    needs=("reference_model",),
    color="#009E73",
    doc="pin each activation's v component to the frozen aligned model's on the same input",
)
