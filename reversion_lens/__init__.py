"""reversion_lens: measure and block fine-tuning reversion along history-defined directions."""

from . import errors, io, sites
from .activations import ResidStats, residual_stats
from .probes import ProbeSet

__all__ = ["errors", "io", "sites", "ProbeSet", "ResidStats", "residual_stats"]
__version__ = "0.1.0"
