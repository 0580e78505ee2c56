"""Hugging Face histories as a setting of the experiment runner: ``setting = "hf"`` and an ``[hf]`` table.

See :mod:`reversion_lens.hf.config` (the table's fields) and :mod:`reversion_lens.hf.setting`.
"""

from .config import AlignConfig, HFConfig, Source, harmbench_csv
from .setting import HFHistory, HFSetting

__all__ = ["HFConfig", "AlignConfig", "Source", "harmbench_csv", "HFSetting", "HFHistory"]
