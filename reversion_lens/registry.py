"""Registries: the one place each kind of pluggable part is listed (modes, nulls, estimators, settings).

A registry maps a name to an entry: the object (a class or a function) and what it declares about
itself (``meta``: the inputs a mode needs, a colour, a one-line description). Adding a mode, a null
model or a direction estimator is one decorated definition in one file and one test::

    from reversion_lens.registry import NULLS

    @NULLS.register("shuffled", doc="cosines with a label-shuffled drift")
    def shuffled(ctx): ...

Built-in entries register themselves when their module is imported; a registry names the modules that
hold its built-ins (``builtins=``) and imports them the first time it is read, so a lookup never misses
one. An entry may also be a lazy ``"package.module:attr"`` string (the settings: the runner knows them
by name only and never imports a setting module itself). Code outside the package registers its own
entries the same way; list the module in ``ExperimentConfig.plugins`` so that worker processes import
it too.

This module imports nothing heavy (no torch), so figures and the command line can read it cheaply.
"""

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["Entry", "Registry", "MODES", "NULLS", "ESTIMATORS", "SETTINGS", "import_plugins"]


@dataclass(frozen=True)
class Entry:
    """One registered part: its name, the object (or a lazy ``"module:attr"`` path) and its metadata."""

    name: str
    target: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def obj(self) -> Any:
        """The registered object, imported on first use when registered as ``"module:attr"``."""
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            return obj
        return self.target

    @property
    def doc(self) -> str:
        return str(self.meta.get("doc", ""))


class Registry:
    """Name -> :class:`Entry` for one kind of part (``kind`` names it in error messages)."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()):
        self.kind = kind
        self._builtins = builtins
        self._loaded = not builtins
        self._entries: dict[str, Entry] = {}

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: the imported modules register into this registry
            for module in self._builtins:
                importlib.import_module(module)

    def register(self, name: str, target: Any = None, **meta: Any) -> Any:
        """Register ``target`` under ``name``; without ``target``, a decorator. Returns the target."""

        def add(obj: Any) -> Any:
            if not isinstance(name, str) or not name or any(c in name for c in ":@, "):
                raise ConfigError(
                    f"{self.kind} name {name!r} must be a non-empty string without ':', '@', ',' or spaces."
                )
            old = self._entries.get(name)
            if old is not None and old.target is not obj:
                raise ConfigError(f"{self.kind} {name!r} is registered already ({old.target!r}); pick another name.")
            self._entries[name] = Entry(name, obj, dict(meta))
            return obj

        return add if target is None else add(target)

    def __getitem__(self, name: str) -> Entry:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}.") from None

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        self._load()
        return iter(list(self._entries.values()))

    def names(self) -> list[str]:
        self._load()
        return list(self._entries)

    def get(self, name: str, default: Any = None) -> Entry | Any:
        self._load()
        return self._entries.get(name, default)


#: Intervention modes (``reversion_lens.interventions``): classes; ``meta["needs"]`` lists what the runner
#: must hand them (``reference_model``, ``probes``, ``reference``, ``base``, ``weight``), ``meta["color"]``
#: is the colour of its arms in every figure, ``meta["options"]`` fixed constructor options.
MODES = Registry("intervention mode", builtins=("reversion_lens.interventions",))

#: Null models of cos(drift, v_rev) (``reversion_lens.nulls``): ``fn(ctx) -> per-layer p99`` functions;
#: each writes the column ``null_p99_<name>``.
NULLS = Registry("null model", builtins=("reversion_lens.nulls",))

#: Direction estimators (``reversion_lens.directions``): ``fn(base, aligned) -> Direction`` functions over
#: two :class:`~reversion_lens.ResidStats`; ``meta["per_prompt"]`` says whether they need per-prompt vectors.
ESTIMATORS = Registry("direction estimator", builtins=("reversion_lens.directions",))

#: Experiment settings: lazy ``"module:Class"`` paths, so the runner knows them only by name.
SETTINGS = Registry("setting")
SETTINGS.register("toy", "reversion_lens.toyworld.setting:ToySetting", doc="the embedded toy world")
SETTINGS.register(
    "unlearning", "reversion_lens.toyworld.setting:UnlearningSetting", doc="toy unlearning of one operation"
)
SETTINGS.register("hf", "reversion_lens.hf.setting:HFSetting", doc="Hugging Face checkpoints from a TOML [hf] table")


def import_plugins(modules: tuple[str, ...] | list[str]) -> None:
    """Import each module (they register their own modes, nulls, estimators or settings)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"plugin module {module!r} cannot be imported ({e}); check it is on PYTHONPATH.") from e


def lookup(registry: Registry, name: str) -> Callable[..., Any]:
    """``registry[name].obj``: the registered object."""
    return registry[name].obj
