"""Every error the toolkit raises on bad input.

Each message names the problem *and* the fix. All derive from :class:`ReversionLensError`, itself
a :class:`ValueError`, so ``except ValueError`` keeps working for callers who do not care which.
"""

__all__ = [
    "ReversionLensError",
    "IncompatibleCheckpointsError",
    "SiteError",
    "ShapeError",
    "DirectionError",
    "NonFiniteError",
    "ProbeError",
    "ResultsFormatError",
    "UnsafeLoadError",
    "ConfigError",
    "SpecError",
    "reject_unknown_fields",
]


class ReversionLensError(ValueError):
    """Base class: bad input, with a message that says how to fix it."""


class IncompatibleCheckpointsError(ReversionLensError):
    """Checkpoints of one history differ in n_layers, d_model or vocabulary."""


class SiteError(ReversionLensError):
    """An unknown site, a site the model does not have, or a layer index out of range."""


class ShapeError(ReversionLensError):
    """A tensor has the wrong shape for what it is combined with."""


class DirectionError(ReversionLensError):
    """A direction with zero norm, non-finite values or the wrong shape."""


class NonFiniteError(ReversionLensError):
    """NaN or inf activations or statistics; nothing non-finite is ever written."""


class ProbeError(ReversionLensError):
    """An empty probe set, token ids outside the vocabulary, or padding without a mask."""


class ResultsFormatError(ReversionLensError):
    """A results file that is corrupted, truncated, or written by an incompatible version."""


class UnsafeLoadError(ReversionLensError):
    """A file that could only be loaded by running arbitrary code (a pickle)."""


class ConfigError(ReversionLensError):
    """A config with an unknown field or a value of the wrong kind."""


class SpecError(ReversionLensError):
    """A model spec that cannot be resolved (unknown name offline, bad revision, ...)."""


def reject_unknown_fields(cls: type, d: dict, what: str) -> None:
    """Raise :class:`ConfigError` if ``d`` has keys that are not fields of dataclass ``cls``."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; valid fields are {sorted(names)}.")
