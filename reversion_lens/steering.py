"""Inference-time steering: add a direction with a coefficient, or ablate one vector everywhere.

Two hook sets, both context managers that add forward hooks and remove exactly those (also when the
body raises, and when registering fails half-way), and both handles for notebooks
(``h = steer(model, v, 4.0).attach(); ...; h.remove()``):

:func:`steer`
    ``h' = h + c_l v_l`` at the direction's site of each steered layer ``l`` (steering-vectors'
    ``multiplier``, repeng's ``set_control(coeff)``), at all positions or only some (``positions``); with
    ``ablate=True``, ``h' = h - (h.v_l) v_l + c_l v_l``: the component along ``v_l`` is *set* to ``c_l``
    (steering-vectors' ``ablation_then_addition_operator``; refusal_direction's directional patching).
:func:`ablate_everywhere`
    refusal_direction's ablation (``pipeline/utils/hook_utils.py``, ``get_all_direction_ablation_hooks``):
    *one* vector projected out at every layer's block input (``resid_pre``), attention output
    (``attn_out``) and MLP output (``mlp_out``), so no layer can write it. The toolkit's own
    ``block(model, v, "ablate")`` acts at each layer's own site with that layer's vector; the two differ.

Positions (``positions=``), for activations ``[batch, pos, d_model]`` of one forward pass:

* ``None`` or ``"all"``: every position (also every new token while generating);
* ``"last"``: position ``-1`` of each forward pass, which is each prompt's last token for unpadded or
  left-padded batches and the new token in incremental decoding. For right-padded batches pass a mask
  (:func:`last_token_mask`). A decoder that recomputes the whole sequence at every step
  (:func:`reversion_lens.generation.greedy_generate`) then steers only the newest token of each step,
  where a cached decoder keeps the earlier steered states: use ``"all"`` for the same result in both;
* an ``int`` (one position, negative from the end), a ``slice`` or a list of ints (steering-vectors'
  ``token_indices``);
* a mask tensor, boolean or 0/1, ``[pos]`` or ``[batch, pos]`` (1 = steer that token); its shape must
  match the forward pass it is used in (a :class:`~reversion_lens.errors.ShapeError` otherwise).
"""

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .directions import Direction
from .errors import ConfigError, DirectionError, ShapeError, SiteError
from .hooks import Cast, add_hook, remove_hooks
from .sites import BRANCH_SITES, check_layers, hook_name, is_bridge

__all__ = [
    "HookSet",
    "steer",
    "ablate_everywhere",
    "last_token_mask",
    "steering_delta",
    "unit_vector",
    "EVERYWHERE_SITES",
]

#: refusal_direction's ablation sites: block input, attention output and MLP output of every layer.
EVERYWHERE_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")


# ------------------------------------------------------------------ pure math
def steering_delta(
    x: Float[Tensor, "*batch d_model"], v: Float[Tensor, " d_model"], coeff: float, ablate: bool = False
) -> Float[Tensor, "*batch d_model"]:
    """What steering adds to ``x``: ``coeff * v``, or ``coeff * v - (x.v) v`` with ``ablate`` (``v`` unit)."""
    delta = coeff * v
    if ablate:
        delta = delta - (x @ v)[..., None] * v
    return delta


def last_token_mask(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """A 0/1 mask of each row's last real token (left or right padding), for ``positions=``."""
    mask = torch.as_tensor(attention_mask)
    if mask.ndim != 2:
        raise ShapeError(f"attention_mask must be [batch, pos], got shape {tuple(mask.shape)}.")
    T = mask.shape[1]
    last = T - 1 - mask.flip(1).argmax(1)
    out = torch.zeros_like(mask, dtype=torch.long)
    out[torch.arange(mask.shape[0]), last] = 1
    return out * mask.bool().any(1, keepdim=True).long()


# ------------------------------------------------------------------ hook bookkeeping
class HookSet:
    """Forward hooks ``(hook name, fn)`` added by :meth:`attach` and removed by :meth:`remove`.

    Each handle is kept as it is registered; :meth:`remove` (and a failure half-way through
    :meth:`attach`) removes exactly those, whatever else is hooked on the model.
    """

    def __init__(self, model: Any, specs: Sequence[tuple[str, Callable]], info: Mapping[str, Any] | None = None):
        if not hasattr(model, "hook_dict"):
            raise SiteError(f"{type(model).__name__} has no hook points; pass a TransformerLens model.")
        self.model = model
        self.specs = list(specs)
        self.info = dict(info or {})
        self._handles: list[tuple[Any, str, Any]] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def hook_count(self) -> int:
        """Hooks this set currently holds on the model."""
        return len(self._handles)

    def attach(self) -> "HookSet":
        """Register every hook (all or none) and return ``self``."""
        if self._handles:
            raise ConfigError("these hooks are already attached; call .remove() first, or build a new one.")
        try:
            for name, fn in self.specs:
                hp = self.model.hook_dict[name]
                self._handles.append((hp, "fwd", add_hook(self.model, hp, name, fn, "fwd")))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove exactly the hooks :meth:`attach` added (idempotent; also after ``model.reset_hooks()``)."""
        remove_hooks(self._handles)

    def __enter__(self) -> "HookSet":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"{type(self).__name__}({self.info}, {len(self.specs)} hooks, {state})"


# ------------------------------------------------------------------ positions and coefficients
def _position_selector(positions: Any) -> Callable[[Tensor], Tensor | None]:
    """A function of the activations ``[batch, pos, d]`` giving a ``[batch|1, pos, 1]`` mask (``None``: all)."""
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return lambda x: None
    if isinstance(positions, str):
        if positions != "last":
            raise ConfigError(f"positions={positions!r}; use None/'all', 'last', an int, a slice, a list or a mask.")
        positions = -1
    if isinstance(positions, Tensor):
        mask = positions.detach()
        if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
            raise ConfigError("a positions tensor must be a mask of 0/1 (or booleans), one entry per token.")
        if mask.ndim not in (1, 2):
            raise ShapeError(f"a positions mask must be [pos] or [batch, pos], got shape {tuple(mask.shape)}.")
        cast = Cast(mask if mask.ndim == 2 else mask[None])

        def from_mask(x: Tensor) -> Tensor:
            m = cast.like(x)
            if m.shape[1] != x.shape[1] or m.shape[0] not in (1, x.shape[0]):
                raise ShapeError(
                    f"the positions mask has shape {tuple(mask.shape)} but this forward pass has [batch, pos] = "
                    f"{list(x.shape[:2])}; build the mask for these tokens (a mask fits one forward pass, not a "
                    "generation loop)."
                )
            return m[..., None]

        return from_mask
    if isinstance(positions, (slice, numbers.Integral)) and not isinstance(positions, bool):
        index: Any = positions
    elif isinstance(positions, Sequence) and all(
        isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in positions
    ):
        index = list(positions)
    else:
        raise ConfigError(
            f"positions of type {type(positions).__name__}; use None/'all', 'last', an int, a slice, a list of ints "
            "or a 0/1 mask tensor [pos] or [batch, pos]."
        )

    def from_index(x: Tensor) -> Tensor:
        T = x.shape[1]
        idx = [index] if isinstance(index, numbers.Integral) else index
        if not isinstance(idx, slice) and any(not -T <= int(i) < T for i in idx):
            raise ShapeError(f"positions {positions!r} are out of range for a forward pass of {T} tokens.")
        m = torch.zeros(1, T, 1, dtype=x.dtype, device=x.device)
        m[:, idx] = 1
        return m

    return from_index


def _per_layer(coeff: Any, layers: tuple[int, ...]) -> list[float]:
    """A float, one value per steered layer (sequence/tensor) or a ``{layer: value}`` mapping."""
    if isinstance(coeff, Mapping):
        missing = [layer for layer in layers if layer not in coeff]
        if missing:
            raise ConfigError(
                f"coeff gives no value for layer(s) {missing}; give one per steered layer {list(layers)}."
            )
        return [float(coeff[layer]) for layer in layers]
    if (isinstance(coeff, numbers.Real) and not isinstance(coeff, bool)) or (
        isinstance(coeff, Tensor) and coeff.ndim == 0
    ):
        return [float(coeff)] * len(layers)
    t = torch.as_tensor(coeff, dtype=torch.float64).flatten()
    if t.numel() != len(layers):
        raise ConfigError(
            f"{t.numel()} coefficients for {len(layers)} steered layers {list(layers)}; give one per layer."
        )
    return [float(c) for c in t]


def _check_write_site(model: Any, site: str) -> None:
    if site == "resid_mid" and is_bridge(model):
        raise SiteError(
            "a forward edit at resid_mid only changes the MLP branch input on TransformerLens 4 (not the residual "
            "trunk); steer at resid_pre or resid_post, or at ln2_in to change only what the MLP norm reads."
        )


# ------------------------------------------------------------------ public verbs
def steer(
    model: Any,
    direction: Direction,
    coeff: Any = 1.0,
    *,
    layers: Sequence[int] | int | None = None,
    positions: Any = None,
    ablate: bool = False,
    scale: str = "unit",
    site: str | None = None,
) -> HookSet:
    """Add ``coeff * v`` to the activations at the direction's site (not yet attached: use ``with``).

    Args:
        model: a TransformerLens model.
        direction: per-layer unit vectors; each steered layer gets its own vector.
        coeff: a float, one value per steered layer (sequence or tensor, in layer order) or ``{layer: value}``.
        layers: any subset of the direction's layers (``None``: all of them).
        positions: which tokens to steer (module docstring): ``None``/``"all"``, ``"last"``, an int, a slice,
            a list of ints or a 0/1 mask ``[pos]`` / ``[batch, pos]``.
        ablate: project ``v`` out first, so the component along ``v`` becomes exactly ``coeff`` (ablate-then-add;
            ``coeff=0`` is a plain ablation at the selected positions).
        scale: ``"unit"`` (``coeff`` multiplies the unit vector) or ``"norm"`` (it multiplies the direction's raw
            norm per layer, ``direction.norms``: ``coeff=1`` adds the mean difference itself, as steering-vectors
            does with ``multiplier=1``).
        site: act here instead of ``direction.site`` (e.g. a layer-norm site; see :mod:`reversion_lens.sites`).

    Returns:
        A :class:`HookSet`: ``with steer(model, v, 4.0): model(tokens)``, or ``.attach()`` / ``.remove()``.
    """
    if not isinstance(direction, Direction):
        raise DirectionError(
            f"steer expects a reversion_lens Direction, got {type(direction).__name__}; wrap raw vectors with "
            "Direction.from_vectors(vectors, layers, site=...) (one row per layer)."
        )
    if scale not in ("unit", "norm"):
        raise ConfigError(
            f"scale={scale!r}; use 'unit' (coeff times the unit vector) or 'norm' (times direction.norms)."
        )
    direction.check_model(model)
    chosen = direction.layers if layers is None else check_layers(model, layers)
    sel = direction.select(list(chosen))
    where = site or sel.site
    _check_write_site(model, where)
    coeffs = _per_layer(coeff, sel.layers)
    if scale == "norm":
        coeffs = [c * float(n) for c, n in zip(coeffs, sel.norms)]
    select = _position_selector(positions)
    specs = [
        (hook_name(model, where, layer), _steering_hook(sel[layer], c, ablate, select))
        for layer, c in zip(sel.layers, coeffs)
    ]
    info = {"kind": "steer", "site": where, "layers": list(sel.layers), "coeff": coeffs, "ablate": ablate,
            "branch_site": where in BRANCH_SITES}  # fmt: skip
    return HookSet(model, specs, info)


def _steering_hook(v: Tensor, coeff: float, ablate: bool, select: Callable[[Tensor], Tensor | None]) -> Callable:
    vc = Cast(v)

    def steer_hook(x: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        if x.ndim != 3:
            raise ShapeError(
                f"steering expects activations [batch, pos, d_model] at {hook.name}, got {tuple(x.shape)}."
            )
        delta = steering_delta(x, vc.like(x), coeff, ablate)
        mask = select(x)
        return x + delta if mask is None else x + mask * delta

    return steer_hook


def ablate_everywhere(model: Any, vector: Tensor | Direction, *, layers: Sequence[int] | int | None = None) -> HookSet:
    """Project one vector out at every layer's ``resid_pre``, ``attn_out`` and ``mlp_out`` (refusal_direction).

    The same semantics as andyrdt/refusal_direction's ``get_all_direction_ablation_hooks``: a forward
    pre-hook on each decoder block (its input, our ``resid_pre``) and forward hooks on each attention and
    MLP module (their outputs, our ``attn_out`` and ``mlp_out``), each replacing ``h`` by ``h - (h.r) r``
    with ``r`` the normalised vector, at every position. Afterwards no layer can write ``r``: every
    ``resid_pre``, ``resid_post`` and branch output has ``|h.r| ~ 0`` (float rounding).
    :func:`reversion_lens.orthogonalize.orthogonalize` makes the same edit permanent in the weights.

    Args:
        model: a TransformerLens model.
        vector: ``[d_model]`` (normalised here), or a one-layer :class:`Direction`.
        layers: the layers to hook (``None``: all; refusal_direction hooks all).

    Returns:
        A :class:`HookSet` (context manager, or ``.attach()`` / ``.remove()``).
    """
    r = unit_vector(vector, model)
    chosen = check_layers(model, layers)
    specs = []
    for layer in chosen:
        for site in EVERYWHERE_SITES:
            specs.append((hook_name(model, site, layer), _steering_hook(r, 0.0, True, lambda x: None)))
    return HookSet(model, specs, {"kind": "ablate_everywhere", "sites": list(EVERYWHERE_SITES), "layers": list(chosen)})


def unit_vector(vector: Tensor | Direction, model: Any | None = None) -> Float[Tensor, " d_model"]:
    """One float32 unit vector from ``[d_model]`` or a one-layer :class:`Direction` (normalised in float64)."""
    if isinstance(vector, Direction):
        if len(vector) != 1:
            raise DirectionError(
                f"this direction has {len(vector)} layers {list(vector.layers)}; one vector is ablated everywhere, "
                "so pick one: direction.select([layer]) or direction[layer]."
            )
        v = vector.vectors[0]
    else:
        v = torch.as_tensor(vector)
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1:
        raise DirectionError(f"expected one vector [d_model], got shape {tuple(v.shape)}.")
    if model is not None and v.shape[0] != int(model.cfg.d_model):
        raise ShapeError(f"vector has d_model {v.shape[0]} but the model has {int(model.cfg.d_model)}.")
    v64 = v.detach().double()
    norm = v64.norm()
    if not torch.isfinite(v64).all() or norm < 1e-12:
        raise DirectionError("the vector is zero or non-finite; no direction to ablate.")
    return (v64 / norm).float()
