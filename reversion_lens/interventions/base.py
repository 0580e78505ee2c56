"""The intervention base class, the pure projection math and the hook bookkeeping every mode shares.

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
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from ..activations import ResidStats
from ..directions import Direction
from ..errors import ConfigError, DirectionError, ShapeError, SiteError
from ..hooks import Cast, add_hook, register_active, remove_hooks, unregister_active
from ..sites import check_layers, is_bridge

__all__ = ["Intervention", "project_out"]


# ------------------------------------------------------------------ pure math
def project_out(
    x: Float[Tensor, "*batch d_model"], basis: Float[Tensor, "k d_model"]
) -> Float[Tensor, "*batch d_model"]:
    """``x - (x Q^T) Q`` for orthonormal rows ``Q``: removes the span of ``basis`` from ``x``."""
    return x - (x @ basis.T) @ basis


def _orthonormal(vectors: Float[Tensor, "k d_model"]) -> Float[Tensor, "r d_model"]:
    """An orthonormal basis of the rows' span (float64 QR; one row stays exactly that unit row)."""
    if vectors.shape[0] == 1:
        return vectors
    q, r = torch.linalg.qr(vectors.double().T)
    keep = r.diagonal().abs() > 1e-8
    return q.T[keep].to(vectors.dtype)


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

    def _grad_hook(self, basis: Float[Tensor, "k d_model"]) -> Callable:
        """A backward hook replacing the gradient by its projection off ``basis`` (orthonormal rows); inert while paused."""
        q = Cast(basis)

        def project_grad(grad: Tensor, hook: Any) -> tuple[Tensor] | None:
            if self._paused or grad is None:
                return None
            return (project_out(grad, q.like(grad)),)

        return project_grad

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def is_paused(self) -> bool:
        """Whether the hooks are registered but inert (inside :meth:`paused`)."""
        return self._paused > 0

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
                self._handles.append((hp, direction, add_hook(self.model, hp, name, fn, direction)))
            self._on_attach()
        except BaseException:
            self._remove_handles()
            raise
        self._attached = True
        register_active(self.model, self)
        return self

    def remove(self) -> None:
        """Remove exactly the hooks :meth:`attach` added (idempotent)."""
        try:
            self._remove_handles()
            self._on_remove()
        finally:
            self._attached = False
            unregister_active(self.model, self)

    def _remove_handles(self) -> None:
        remove_hooks(self._handles)

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


def _grouped_projections(
    model: Any, names_per_layer: Mapping[int, list[str]], direction: Direction
) -> list[tuple[str, Tensor]]:
    """One ``(hook name, orthonormal basis)`` per distinct hook point, composing layers that share it."""
    hook_dict = model.hook_dict
    groups: dict[int, tuple[str, list[Tensor]]] = {}
    for layer, names in names_per_layer.items():
        for name in names:
            key = id(hook_dict[name])
            groups.setdefault(key, (name, []))[1].append(direction[layer])
    return [(name, _orthonormal(torch.stack(vs))) for name, vs in groups.values()]


def _check_forward_site(model: Any, site: str) -> None:
    if site == "resid_mid" and is_bridge(model):
        raise SiteError(
            "a forward edit at resid_mid only changes the MLP branch input on TransformerLens 4 (not the "
            "residual trunk); use a direction derived at resid_pre or resid_post."
        )


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
