"""Interventions: block (or push) motion along a direction, per layer, and remove exactly what was added.

Every mode is a class built by :func:`block` (``block(model, v, mode="grad", layers=None, **opts)``).
It is a context manager (``with block(model, v): ...``) and a handle for notebooks
(``h = block(model, v).attach(); ...; h.remove()``). Hooks are registered one at a time, each handle
kept as it is added; on exit, on an exception in the body or on a failure half-way through
registration, exactly those handles are removed and nothing else. ``layers`` is any subset of the
direction's layers (all by default), so a per-layer ablation is one loop. The random-direction
control of any call is the same call with :func:`random_control` (``v`` replaced by a seeded random
direction with the same layers, site and norms).

What each mode guarantees, and what it does not:

``grad`` (default): a backward hook at each residual write of each blocked layer (``resid_pre``,
    ``attn_out``, ``resid_post``: :func:`reversion_lens.sites.residual_write_hooks`) replaces the
    gradient ``g`` by ``g - (g.v) v``: one hook per hook point; where sites of several layers fall on one
    point, one hook projects out the span of their vectors. Guarantees: the gradient leaving every blocked
    site has no ``v`` component, so the gradients of the weights that write there directly (attention
    output and MLP output weights and biases of the layer; token and position embeddings when layer 0 is
    blocked) have ``v^T dL/dW = 0`` along the ``d_model`` axis (to float rounding). Backward hooks bind at
    *forward* time: run the forward pass inside the context. Does not guarantee: that the weights'
    *updates* stay orthogonal under Adam/AdamW (per-element scaling rotates them: 8e-2 after 20 steps,
    TL4_GUIDE section 3; use ``update``) or under SGD weight decay; orthogonality with **dropout** in
    train mode (the mask acts between hook and weight: 1e-2 to 4e-2 on GPT-2) or with **tied embeddings**
    (the unembedding's gradient reaches the shared matrix unprojected: 5e-2 on GPT-2); and it is a
    first-order statement: the activations' ``v`` component still moves, because weights upstream of
    and inside the blocked layer (LayerNorm, Q/K/V, MLP input) change what the writing weights receive.
``clamp``: a forward hook at the direction's site pins each activation's ``v`` component, at every
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
``ablate``: forward projection ``h - (h.v) v`` at the direction's site (``sites=`` for more), for
    inference. Guarantees ``h.v = 0`` at those points; later layers may write ``v`` back.
``penalty``: no hooks; :meth:`Penalty.extra_loss` runs the probe prompts, reads the probe activations
    at the direction's site, takes each layer's mean projection onto ``v`` relative to the reference,
    ``r_l = (mean_l.v_l - c_l) / s_l`` (``s_l = ||mean_base - mean_ref||`` when ``base`` is given, so
    ``r`` is the reversion ratio; else 1), and returns ``weight * mean_l relu(r_l)^2`` for
    ``sign="block"`` (motion toward ``v`` is penalised, motion away is free) or ``-weight * mean_l r_l``
    for ``sign="push"`` (motion toward ``v`` is rewarded). It only acts through a training loop that adds
    it to the loss (:func:`reversion_lens.training.finetune` does). Soft: nothing is guaranteed.
``update``: after each optimizer step, :meth:`UpdateBlock.after_step` removes the ``v`` component,
    along the ``d_model`` axis, of the update of every residual-writing weight of the blocked layers
    (``blocks.{l}.attn.o`` and ``blocks.{l}.mlp.out`` weights and biases; ``embed`` and ``pos_embed``
    for layer 0): it keeps ``v^T W`` equal to its value at :meth:`attach`, so gradient steps, Adam
    scaling and weight decay all leave it unchanged. Guarantees ``max|v^T (W_t - W_0)| ~ 0`` for those
    weights under any optimizer. Does not: block other weights (LayerNorm, Q/K/V, MLP input) whose
    change alters what the writing weights read, so the activations' ``v`` component still moves; with
    tied embeddings the unembedding shares the pinned matrix; the optimizer's moment estimates still hold
    ``v`` components (only the realised update is projected). Needs the loop to call ``after_step``
    (``finetune`` does) or ``optimizer=`` (a step post-hook).

For every mode: each block reads the residual through a LayerNorm, whose scale depends on the
whole vector, so pinning or blocking the ``v`` component does not freeze what later layers see; the
guarantees are per site and per layer's own vector (layer ``l``'s vector is applied at layer ``l``'s
sites only); and ``enable_compatibility_mode()`` folds LayerNorm and swaps the trained weights, so
do not fine-tune in it (TL4_GUIDE section 3).

The training-loop protocol: an intervention may return an auxiliary loss from ``extra_loss(model,
step)`` and act after the optimizer from ``after_step(model, optimizer)``; ``state_dict()`` /
``load_state_dict()`` hold what a resumed run needs. :func:`active_interventions` lists what is
attached to a model (``finetune`` also calls those), and :func:`paused` turns their hooks into no-ops
for a measurement of the bare weights.
"""

import contextlib
import dataclasses
import hashlib
import inspect
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import ResidStats
from .directions import Direction, random_direction
from .errors import ConfigError, DirectionError, ShapeError, SiteError
from .probes import ProbeSet
from .sites import all_modules, check_layers, hook_name, is_bridge, residual_write_hooks

__all__ = [
    "Intervention",
    "GradBlock",
    "Clamp",
    "Ablate",
    "Penalty",
    "UpdateBlock",
    "MODES",
    "block",
    "random_control",
    "active_interventions",
    "paused",
    "project_out",
    "residual_write_params",
]

_ACTIVE: "weakref.WeakKeyDictionary[Any, list[Intervention]]" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------ pure math
def project_out(x: Float[Tensor, "*batch d_model"], basis: Float[Tensor, "k d_model"]) -> Float[Tensor, "*batch d_model"]:
    """``x - (x Q^T) Q`` for orthonormal rows ``Q``: removes the span of ``basis`` from ``x``."""
    return x - (x @ basis.T) @ basis


def _orthonormal(vectors: Float[Tensor, "k d_model"]) -> Float[Tensor, "r d_model"]:
    """An orthonormal basis of the rows' span (float64 QR; one row stays exactly that unit row)."""
    if vectors.shape[0] == 1:
        return vectors
    q, r = torch.linalg.qr(vectors.double().T)
    keep = r.diagonal().abs() > 1e-8
    return q.T[keep].to(vectors.dtype)


class _Cast:
    """A tensor cached per (device, dtype), so hooks never convert twice."""

    def __init__(self, t: Tensor):
        self.t = t
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = self.t.to(device=x.device, dtype=x.dtype)
        return out


# ------------------------------------------------------------------ hook bookkeeping
def _add_hook(model: Any, hp: Any, name: str, fn: Callable, direction: str) -> Any:
    check = getattr(model, "check_hooks_to_add", None)
    if check is not None:
        check(hp, name, fn, dir=direction)
    handle = hp.add_hook(fn, dir=direction)
    if handle is None:  # legacy HookPoint.add_hook returns nothing; the handle is the last one listed
        handle = (hp.fwd_hooks if direction == "fwd" else hp.bwd_hooks)[-1]
    return handle


def _remove_hook(hp: Any, direction: str, handle: Any) -> None:
    if direction == "module":  # a plain PyTorch module hook (RemovableHandle)
        handle.remove()
        return
    handle.hook.remove()
    handles = hp.fwd_hooks if direction == "fwd" else hp.bwd_hooks
    handles[:] = [h for h in handles if h is not handle]


class Intervention:
    """Base class: hooks added by :meth:`attach`, removed by :meth:`remove`; no-op training protocol.

    Subclasses list their hooks in :meth:`_hook_specs` as ``(hook_name, "fwd" | "bwd", fn)``; hooks
    anywhere else (another model, module hooks) go through :meth:`_keep` in :meth:`_on_attach`, so that
    they are removed with the rest, also when attaching fails half-way.
    """

    mode: ClassVar[str] = "none"

    def __init__(self, model: Any, direction: Direction, layers: Sequence[int] | int | None = None):
        if not isinstance(direction, Direction):
            raise DirectionError(
                f"expected a reversion_lens Direction, got {type(direction).__name__}; build one with "
                "Direction.from_vectors(vectors, layers) or reversion_lens.directions.mean_difference."
            )
        direction.check_model(model)
        chosen = direction.layers if layers is None else check_layers(model, layers)
        self.model = model
        self.direction = direction.select(list(chosen))
        self.layers: tuple[int, ...] = self.direction.layers
        self._handles: list[tuple[Any, str, Any]] = []
        self._attached = False
        self._paused = 0

    # -------------------------------------------------------------- hooks
    def _hook_specs(self) -> list[tuple[str, str, Callable]]:
        return []

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def hook_count(self) -> int:
        """Hooks this intervention currently holds (on the model; for a per-input clamp also on its reference)."""
        return len(self._handles)

    def attach(self) -> "Intervention":
        """Register the hooks (all or none) and return ``self``, a handle with :meth:`remove`."""
        if self._attached:
            raise ConfigError(
                f"this {self.mode!r} intervention is already attached; call .remove() first, or use a new one."
            )
        try:
            specs = self._hook_specs()
            hook_dict = self.model.hook_dict if specs else {}
            for name, direction, fn in specs:
                hp = hook_dict[name]
                self._handles.append((hp, direction, _add_hook(self.model, hp, name, fn, direction)))
            self._on_attach()
        except BaseException:
            self._remove_handles()
            raise
        self._attached = True
        _ACTIVE.setdefault(self.model, []).append(self)
        return self

    def remove(self) -> None:
        """Remove exactly the hooks :meth:`attach` added (idempotent)."""
        try:
            self._remove_handles()
            self._on_remove()
        finally:
            self._attached = False
            active = _ACTIVE.get(self.model, [])
            active[:] = [iv for iv in active if iv is not self]

    def _remove_handles(self) -> None:
        errors = []
        while self._handles:
            hp, direction, handle = self._handles.pop()
            try:
                _remove_hook(hp, direction, handle)
            except Exception as e:  # keep removing the rest; report the first failure
                errors.append(e)
        if errors:
            raise errors[0]

    def _keep(self, hp: Any, direction: str, handle: Any) -> None:
        """Hold a handle for removal: ``(hook point, "fwd" | "bwd", LensHandle)`` or ``(None, "module", RemovableHandle)``."""
        self._handles.append((hp, direction, handle))

    def _on_attach(self) -> None:
        pass

    def _on_remove(self) -> None:
        pass

    def __enter__(self) -> "Intervention":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hooks stay registered but do nothing inside this block (re-entrant)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    # -------------------------------------------------------------- training-loop protocol
    def extra_loss(self, model: Any, step: int) -> Tensor | None:
        """An auxiliary loss the loop adds at ``step`` (``None``: nothing to add)."""
        return None

    def after_step(self, model: Any, optimizer: torch.optim.Optimizer) -> None:
        """Called right after ``optimizer.step()``."""

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors a resumed run needs to continue exactly (empty for stateless modes)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ConfigError(f"{self.mode!r} interventions hold no state, got keys {sorted(state)}.")

    def describe(self) -> dict[str, Any]:
        """JSON-able identity: mode, layers, site, a hash of the vectors, options (recorded with runs)."""
        blob = self.direction.vectors.detach().cpu().float().contiguous().numpy().tobytes()
        return {
            "mode": self.mode,
            "layers": list(self.layers),
            "site": self.direction.site,
            "direction": {
                "method": self.direction.provenance.get("method"),
                "seed": self.direction.provenance.get("seed"),
                "sha256": hashlib.sha256(blob).hexdigest()[:16],
            },
            **self._options(),
        }

    def _options(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"{type(self).__name__}(layers={list(self.layers)}, site={self.direction.site!r}, {state})"


def _grouped_projections(model: Any, names_per_layer: Mapping[int, list[str]], direction: Direction) -> list[tuple[str, Tensor]]:
    """One ``(hook name, orthonormal basis)`` per distinct hook point, composing layers that share it."""
    hook_dict = model.hook_dict
    groups: dict[int, tuple[str, list[Tensor]]] = {}
    for layer, names in names_per_layer.items():
        for name in names:
            key = id(hook_dict[name])
            groups.setdefault(key, (name, []))[1].append(direction[layer])
    return [(name, _orthonormal(torch.stack(vs))) for name, vs in groups.values()]


# ------------------------------------------------------------------ modes
class GradBlock(Intervention):
    """``grad``: project ``v`` out of the gradient at every residual write of each blocked layer."""

    mode = "grad"

    def _hook_specs(self) -> list[tuple[str, str, Callable]]:
        names = {layer: residual_write_hooks(self.model, layer) for layer in self.layers}
        return [(name, "bwd", self._make_hook(basis)) for name, basis in _grouped_projections(self.model, names, self.direction)]

    def _make_hook(self, basis: Tensor) -> Callable:
        q = _Cast(basis)

        def project_grad(grad: Tensor, hook: Any) -> tuple[Tensor] | None:
            if self._paused or grad is None:
                return None
            return (project_out(grad, q.like(grad)),)

        return project_grad


def _check_forward_site(model: Any, site: str) -> None:
    if site == "resid_mid" and is_bridge(model):
        raise SiteError(
            "a forward edit at resid_mid only changes the MLP branch input on TransformerLens 4 (not the "
            "residual trunk); use a direction derived at resid_pre or resid_post."
        )


class Ablate(Intervention):
    """``ablate``: forward projection ``h - (h.v) v`` at the direction's site (or ``sites``)."""

    mode = "ablate"

    def __init__(self, model: Any, direction: Direction, layers: Sequence[int] | int | None = None, *, sites: Sequence[str] | None = None):
        super().__init__(model, direction, layers)
        self.sites = tuple(sites) if sites is not None else (direction.site,)
        for site in self.sites:
            _check_forward_site(model, site)

    def _hook_specs(self) -> list[tuple[str, str, Callable]]:
        names = {layer: [hook_name(self.model, site, layer) for site in self.sites] for layer in self.layers}
        return [(name, "fwd", self._make_hook(basis)) for name, basis in _grouped_projections(self.model, names, self.direction)]

    def _make_hook(self, basis: Tensor) -> Callable:
        q = _Cast(basis)

        def project_act(x: Tensor, hook: Any) -> Tensor | None:
            if self._paused:
                return None
            return project_out(x, q.like(x))

        return project_act

    def _options(self) -> dict[str, Any]:
        return {"sites": list(self.sites)}


def _reference_rows(reference: Any, direction: Direction, layers: tuple[int, ...], site: str) -> Tensor:
    """``reference`` as float64 ``[layer, d_model]`` means or ``[layer]`` scalars for ``layers``.

    Accepts :class:`ResidStats` (at ``site``), a ``{layer: scalar}`` dict, or a tensor/sequence of means
    ``[layer, d_model]`` or scalars ``[layer]`` indexed like ``direction.layers``.
    """
    if isinstance(reference, ResidStats):
        if reference.site != site:
            raise SiteError(
                f"reference statistics are at site {reference.site!r} but the intervention acts at {site!r}; "
                "compute them with residual_stats(..., site=...) at the direction's site."
            )
        return torch.stack([reference.mean[reference.layer_index(layer)] for layer in layers]).double()
    if isinstance(reference, Mapping):
        missing = [layer for layer in layers if layer not in reference]
        if missing:
            raise ShapeError(f"reference gives no value for layer(s) {missing}; give one per blocked layer.")
        return torch.tensor([float(reference[layer]) for layer in layers], dtype=torch.float64)
    t = torch.as_tensor(reference).detach().double().cpu()
    fits = t.ndim in (1, 2) and t.shape[0] == len(direction.layers) and (t.ndim == 1 or t.shape[1] == direction.d_model)
    if not fits:
        raise ShapeError(
            f"reference of shape {tuple(t.shape)} fits neither [layer, d_model] means nor [layer] scalars for "
            f"the direction's layers {list(direction.layers)}; pass ResidStats, or means/scalars indexed like them."
        )
    return t[[direction.layers.index(layer) for layer in layers]]


def _components(rows: Tensor, direction: Direction) -> Float[Tensor, " layer"]:
    """Scalars stay; means ``[layer, d_model]`` become their projections on the (selected) direction."""
    return rows if rows.ndim == 1 else (rows * direction.vectors.double().cpu()).sum(1)


class _StopReference(Exception):
    pass



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
        vc = _Cast(v)

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
            raise ShapeError(f"reference components {tuple(t.shape)} do not match activations {tuple(x.shape)} at layer {layer}.")
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
            self._keep(hp, "fwd", _add_hook(ref, hp, name, self._make_reader(i, self.direction[layer], i == last), "fwd"))
        self._keep(None, "module", self.model.register_forward_pre_hook(self._capture, with_kwargs=True))
        self._keep(None, "module", self.model.register_forward_hook(self._release, always_call=True))
        self._ref_modules = all_modules(ref)

    def _on_remove(self) -> None:
        self._targets = self._sink = None
        self._ref_modules = []

    def _make_reader(self, i: int, v: Tensor, stop: bool) -> Callable:
        vc = _Cast(v)

        def read(x: Float[Tensor, "batch pos d_model"], hook: Any) -> None:
            if self._sink is None:  # the reference used on its own, outside the clamp's forward: inert
                return None
            self._sink[i] = (x @ vc.like(x)).detach()
            if stop:
                raise _StopReference
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
        modes = [m.training for m in self._ref_modules]
        self._sink = sink
        try:
            for m in self._ref_modules:
                object.__setattr__(m, "training", False)
            with torch.no_grad():
                try:
                    self.reference_model(*args, **kwargs)
                except _StopReference:
                    pass
        finally:
            self._sink = None
            for m, mode in zip(self._ref_modules, modes):
                object.__setattr__(m, "training", mode)
        return sink

    def _options(self) -> dict[str, Any]:
        if self.per_input:
            ref = self.reference_model
            return {"reference": "per-input", "reference_model": type(ref).__name__,
                    "reference_cfg": {k: getattr(ref.cfg, k, None) for k in ("n_layers", "d_model", "d_vocab")}}  # fmt: skip
        return {"components": self.components.tolist()}


class _StopForward(Exception):
    pass


class Penalty(Intervention):
    """``penalty``: an auxiliary loss on the probe activations' projection onto ``v`` (see module docs)."""

    mode = "penalty"

    def __init__(
        self,
        model: Any,
        direction: Direction,
        layers: Sequence[int] | int | None = None,
        *,
        probes: ProbeSet,
        reference: Any,
        base: Any = None,
        weight: float = 1.0,
        sign: str = "block",
        batch_size: int | None = None,
    ):
        super().__init__(model, direction, layers)
        if sign not in ("block", "push"):
            raise ConfigError(f"sign must be 'block' (penalise motion toward v) or 'push' (reward it), not {sign!r}.")
        probes.check_vocab(int(model.cfg.d_vocab))
        site = self.direction.site
        self.probes, self.weight, self.sign = probes, float(weight), sign
        ref_rows = _reference_rows(reference, direction, self.layers, site)
        self.reference = _components(ref_rows, self.direction)
        self.scale = torch.ones(len(self.layers), dtype=torch.float64)
        if base is not None:
            base_rows = _reference_rows(base, direction, self.layers, site)
            if base_rows.ndim == 2 and ref_rows.ndim == 2:  # ||mean_base - mean_ref||, as drift_metrics
                self.scale = (base_rows - ref_rows).norm(dim=1)
            else:
                self.scale = (_components(base_rows, self.direction) - self.reference).abs()
            if (self.scale < 1e-12).any():
                raise ShapeError("base and reference coincide at some layer; no reversion scale is defined there.")
        self._batches = list(probes.batches(batch_size or len(probes)))

    def projections(self, model: Any, step: int = 0) -> Float[Tensor, " layer"]:
        """Per-layer ``r_l`` on probe batch ``step % n_batches`` (differentiable)."""
        batch = self._batches[step % len(self._batches)]
        names = {hook_name(model, self.direction.site, layer): i for i, layer in enumerate(self.layers)}
        canon = {getattr(model.hook_dict[n], "name", n) or n: i for n, i in names.items()}
        last = max(canon.values())
        device = next(model.parameters()).device
        w = batch.weights.to(device)
        got: dict[int, Tensor] = {}

        def read(x: Tensor, hook: Any) -> None:
            i = canon.get(hook.name, names.get(hook.name))
            got[i] = torch.einsum("bpd,bp->bd", x, w.to(x.dtype)).mean(0)
            if i == last:
                raise _StopForward

        with model.hooks(fwd_hooks=[(n, read) for n in names]):
            try:
                model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device))
            except _StopForward:
                pass
        means = torch.stack([got[i] for i in range(len(self.layers))])
        v = self.direction.vectors.to(means.device, means.dtype)
        ref = self.reference.to(means.device, means.dtype)
        return ((means * v).sum(1) - ref) / self.scale.to(means.device, means.dtype)

    def extra_loss(self, model: Any, step: int) -> Tensor | None:
        if self._paused:
            return None
        r = self.projections(model, step)
        if self.sign == "block":
            return self.weight * torch.relu(r).pow(2).mean()
        return -self.weight * r.mean()

    def _options(self) -> dict[str, Any]:
        return {"weight": self.weight, "sign": self.sign, "probes": self.probes.hash(), "n_batches": len(self._batches)}


def residual_write_params(model: Any, layers: Sequence[int] | None = None) -> list[tuple[str, int, torch.nn.Parameter, int]]:
    """``(label, layer, parameter, d_model axis)`` for every weight writing to the residual stream.

    Per layer: ``blocks.{l}.attn.o`` and ``blocks.{l}.mlp.out`` (weight and bias); for layer 0 also
    ``embed`` and ``pos_embed`` (rotary models have none). The axis is found from the wrapped module's
    type (``nn.Linear``: 0; ``nn.Embedding`` and Hugging Face ``Conv1D``: 1; biases: 0).
    """
    D = int(model.cfg.d_model)
    out = []
    for layer in check_layers(model, layers):
        labels = [f"blocks.{layer}.attn.o", f"blocks.{layer}.mlp.out"]
        if layer == 0:
            labels = ["embed", "pos_embed"] + labels
        for label in labels:
            mod = _get_module(model, label)
            if mod is None:
                optional = label == "pos_embed" or (label.endswith("mlp.out") and getattr(model.cfg, "attn_only", False))
                if optional:  # rotary models have no position embedding, attention-only ones no MLP
                    continue
                raise SiteError(
                    f"{type(model).__name__} has no module {label!r}; the update block supports TransformerLens 4 "
                    "bridges (blocks.{l}.attn.o, blocks.{l}.mlp.out, embed, pos_embed). Use mode='grad' instead."
                )
            inner = getattr(mod, "original_component", None) or mod
            for pname in ("weight", "bias"):
                p = getattr(inner, pname, None)
                if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                    out.append((f"{label}.{pname}", layer, p, _d_model_axis(inner, p, D, label)))
    return out


def _get_module(model: Any, path: str) -> Any:
    obj = model
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _d_model_axis(module: torch.nn.Module, p: Tensor, D: int, label: str) -> int:
    if p.ndim == 1:
        axis = 0
    elif isinstance(module, torch.nn.Linear):
        axis = 0
    elif isinstance(module, torch.nn.Embedding) or type(module).__name__ == "Conv1D":
        axis = 1
    else:
        axes = [i for i, n in enumerate(p.shape) if n == D]
        if len(axes) != 1:
            raise SiteError(f"cannot tell which axis of {label} {tuple(p.shape)} is d_model={D}; use mode='grad'.")
        axis = axes[0]
    if p.shape[axis] != D:
        raise SiteError(f"{label} has shape {tuple(p.shape)}; expected d_model={D} on axis {axis}.")
    return axis


def _v_component(p: Tensor, v: Tensor, axis: int) -> Tensor:
    return torch.tensordot(v, p, dims=([0], [0])) if axis == 0 else p @ v


class UpdateBlock(Intervention):
    """``update``: keep ``v^T W`` of residual-writing weights fixed across optimizer steps."""

    mode = "update"

    def __init__(self, model: Any, direction: Direction, layers: Sequence[int] | int | None = None, *, optimizer: torch.optim.Optimizer | None = None):
        super().__init__(model, direction, layers)
        self.params = residual_write_params(model, self.layers)
        self.optimizer = optimizer
        self._pinned: list[Tensor] = []
        self._opt_handle: Any = None

    def _on_attach(self) -> None:
        with torch.no_grad():
            self._pinned = [_v_component(p, self.direction[layer].to(p), axis).clone() for _, layer, p, axis in self.params]
        if self.optimizer is not None:
            self._opt_handle = self.optimizer.register_step_post_hook(lambda opt, *_: self.after_step(self.model, opt))

    def _on_remove(self) -> None:
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None

    @torch.no_grad()
    def after_step(self, model: Any, optimizer: torch.optim.Optimizer) -> None:
        if self._paused or not self._attached:
            return
        for (_, layer, p, axis), c in zip(self.params, self._pinned):
            v = self.direction[layer].to(p)
            excess = _v_component(p, v, axis) - c
            if axis == 0:
                p.sub_(v.reshape(-1, *([1] * (p.ndim - 1))) * excess)
            else:
                p.sub_(excess[:, None] * v)

    def state_dict(self) -> dict[str, Tensor]:
        return {label: c for (label, *_), c in zip(self.params, self._pinned)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        labels = [label for label, *_ in self.params]
        if sorted(state) != sorted(labels):
            raise ConfigError(f"update-block state holds {sorted(state)}, expected {sorted(labels)}; it is from another run.")
        self._pinned = [state[label].to(p) for label, _, p, _ in self.params]


MODES: dict[str, type[Intervention]] = {
    "grad": GradBlock,
    "clamp": Clamp,
    "ablate": Ablate,
    "penalty": Penalty,
    "update": UpdateBlock,
}


def block(model: Any, direction: Direction, mode: str = "grad", layers: Sequence[int] | int | None = None, **opts: Any) -> Intervention:
    """Build an intervention (not yet attached): ``with block(model, v): ...`` or ``block(...).attach()``.

    Args:
        model: a TransformerLens model.
        direction: per-layer unit vectors (``Direction``); its ``site`` is where forward modes act.
        mode: ``"grad"`` (default), ``"clamp"``, ``"ablate"``, ``"penalty"`` or ``"update"``.
        layers: any subset of ``direction.layers`` (``None``: all of them).
        **opts: ``clamp``: ``reference_model`` (per input) or ``reference`` (mean); ``ablate``: ``sites``;
            ``penalty``: ``probes``, ``reference``, ``base``, ``weight``, ``sign``, ``batch_size``;
            ``update``: ``optimizer``.
    """
    cls = MODES.get(mode)
    if cls is None:
        raise ConfigError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    try:
        inspect.signature(cls).bind(model, direction, layers, **opts)
    except TypeError as e:
        raise ConfigError(f"bad options for mode {mode!r}: {e}. See reversion_lens.interventions.block.") from None
    return cls(model, direction, layers, **opts)


def random_control(direction: Direction, seed: int = 0) -> Direction:
    """The random-direction control of ``direction``: same layers, site and norms, seeded isotropic vectors."""
    ctrl = random_direction(direction.d_model, direction.layers, seed, site=direction.site, like=direction)
    return dataclasses.replace(ctrl, provenance={**ctrl.provenance, "control_of": direction.provenance.get("method")})


def active_interventions(model: Any) -> list[Intervention]:
    """Interventions currently attached to ``model``, in attach order."""
    return list(_ACTIVE.get(model, []))


@contextlib.contextmanager
def paused(model: Any) -> Iterator[None]:
    """Every intervention attached to ``model`` does nothing inside this block (to measure bare weights)."""
    with contextlib.ExitStack() as stack:
        for iv in active_interventions(model):
            stack.enter_context(iv.paused())
        yield
