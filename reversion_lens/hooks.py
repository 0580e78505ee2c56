"""Hook plumbing shared by every module that reads or edits a forward pass.

* :class:`EarlyStop`: the one early-stop mechanism. A hook calls ``stop()`` once it has read what it
  needs; ``run(model, ...)`` returns ``True`` when the pass was cut short that way. Each signal belongs to
  one ``EarlyStop``, so a nested forward (a clamp's reference model inside a statistics pass) never
  swallows another's stop.
* :func:`eval_mode`: eval mode for a block, every submodule's own flag restored afterwards.
* :class:`Cast`: a hook's constant tensor converted once per (device, dtype) of what it edits.
* :func:`add_hook` / :func:`remove_hooks`: hook handles kept one by one, so that a hook set (an intervention,
  a steering set) removes exactly the hooks it added, whatever else is hooked on the model.
* The active-interventions registry: interventions announce themselves when attached
  (:func:`register_active`), so the training loop, the tracker and generation can list them
  (:func:`active_interventions`) and measure the bare weights (:func:`paused`).
"""

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch

from .sites import all_modules

__all__ = [
    "StopForward",
    "EarlyStop",
    "eval_mode",
    "kept_modes",
    "Cast",
    "add_hook",
    "remove_hook",
    "remove_hooks",
    "register_active",
    "unregister_active",
    "active_interventions",
    "paused",
]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; ``owner`` is the :class:`EarlyStop` that catches it."""

    def __init__(self, owner: "EarlyStop"):
        super().__init__("forward pass stopped early by a reversion_lens hook")
        self.owner = owner


class EarlyStop:
    """An early-stop signal: hooks call :meth:`stop`; :meth:`run` calls a function and catches only its own stop."""

    def stop(self) -> NoReturn:
        raise StopForward(self)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """``fn(*args, **kwargs)``; ``True`` if a hook stopped it through this signal, ``False`` if it ran to the end."""
        try:
            fn(*args, **kwargs)
        except StopForward as e:
            if e.owner is not self:
                raise
            return True
        return False


@contextlib.contextmanager
def kept_modes(model: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> Iterator[list[torch.nn.Module]]:
    """Restore every distinct submodule's train/eval flag on exit; yields the modules.

    ``modules``: the model's :func:`~reversion_lens.sites.all_modules`, when the caller keeps them (a hook
    that toggles modes on every forward need not walk the model each time)."""
    modules = all_modules(model) if modules is None else modules
    modes = [m.training for m in modules]
    try:
        yield modules
    finally:
        for m, mode in zip(modules, modes):
            object.__setattr__(m, "training", mode)  # what Module.train() sets, without its per-call overhead


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own train/eval flag restored afterwards.

    Flags are set on each distinct module directly: ``model.eval()`` on a TL4 bridge visits shared
    submodules many times over (about 5x the module count) and misses nothing this does not.
    """
    with kept_modes(model, modules) as kept:
        for m in kept:
            object.__setattr__(m, "training", False)
        yield


# ---------------------------------------------------------------------- hook constants and handles
class Cast:
    """A tensor cached per (device, dtype), so hooks never convert twice: ``Cast(v).like(x)`` is ``v`` as ``x``'s."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = self.t.to(device=x.device, dtype=x.dtype)
        return out


def add_hook(model: Any, hp: Any, name: str, fn: Callable, direction: str) -> Any:
    """Add ``fn`` to hook point ``hp`` (``model.hook_dict[name]``), ``"fwd"`` or ``"bwd"``, with the model's own
    checks; return the handle that :func:`remove_hook` takes."""
    check = getattr(model, "check_hooks_to_add", None)
    if check is not None:
        check(hp, name, fn, dir=direction)
    handle = hp.add_hook(fn, dir=direction)
    if handle is None:  # legacy HookPoint.add_hook returns nothing; the handle is the last one listed
        handle = (hp.fwd_hooks if direction == "fwd" else hp.bwd_hooks)[-1]
    return handle


def remove_hook(hp: Any, direction: str, handle: Any) -> None:
    """Remove one hook added by :func:`add_hook` (``direction="module"``: a plain PyTorch ``RemovableHandle``)."""
    if direction == "module":  # a plain PyTorch module hook (RemovableHandle)
        handle.remove()
        return
    handle.hook.remove()
    handles = hp.fwd_hooks if direction == "fwd" else hp.bwd_hooks
    handles[:] = [h for h in handles if h is not handle]


def remove_hooks(handles: list[tuple[Any, str, Any]]) -> None:
    """Pop and remove every ``(hook point, direction, handle)`` of ``handles``, last first; a failure does not
    stop the rest, and the first one is raised at the end."""
    errors = []
    while handles:
        hp, direction, handle = handles.pop()
        try:
            remove_hook(hp, direction, handle)
        except Exception as e:  # keep removing the rest; report the first failure
            errors.append(e)
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------- active interventions
_ACTIVE: "weakref.WeakKeyDictionary[Any, list[Any]]" = weakref.WeakKeyDictionary()


def register_active(model: Any, intervention: Any) -> None:
    """Record ``intervention`` as attached to ``model`` (called by ``Intervention.attach``)."""
    _ACTIVE.setdefault(model, []).append(intervention)


def unregister_active(model: Any, intervention: Any) -> None:
    active = _ACTIVE.get(model, [])
    active[:] = [iv for iv in active if iv is not intervention]


def active_interventions(model: Any) -> list[Any]:
    """Interventions currently attached to ``model``, in attach order."""
    return list(_ACTIVE.get(model, []))


@contextlib.contextmanager
def paused(model: Any) -> Iterator[None]:
    """Every intervention attached to ``model`` does nothing inside this block (to measure bare weights)."""
    with contextlib.ExitStack() as stack:
        for iv in active_interventions(model):
            stack.enter_context(iv.paused())
        yield
