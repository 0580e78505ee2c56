"""The toy world: a tiny transformer trained from scratch on a synthetic chat language, with a
pretraining phase (always comply), a shallow alignment phase (refuse harmful operations) and the data
to fine-tune it on harmless tasks, where it reverts toward its pretrained behaviour.

>>> from reversion_lens.toyworld import ToyConfig, build_history, evaluate
>>> hist = build_history(ToyConfig.preset("tiny"), seed=0, cache_dir="cache/toyworld")  # doctest: +SKIP
>>> evaluate(hist.load("aligned"), **hist.eval_sets())["harmful_rate"]                   # doctest: +SKIP
"""

from .history import HISTORY_FIELDS, PRETRAIN_FIELDS, ToyConfig, ToyHistory, build_history
from .language import (
    DEFAULT_HARMFUL,
    OPERATIONS,
    OPS,
    PHASES,
    Example,
    ToyData,
    ToyLanguage,
    ToyTokenizer,
    Verdict,
    evaluate,
    judge,
    make_batch,
    refusal_prob,
    response_loss,
)
from .unlearning import UnlearningHistory, build_unlearning_history, unlearning_config

__all__ = [
    "ToyConfig",
    "ToyHistory",
    "build_history",
    "HISTORY_FIELDS",
    "PRETRAIN_FIELDS",
    "ToyTokenizer",
    "ToyLanguage",
    "ToyData",
    "Example",
    "Verdict",
    "judge",
    "evaluate",
    "response_loss",
    "refusal_prob",
    "make_batch",
    "OPERATIONS",
    "OPS",
    "DEFAULT_HARMFUL",
    "PHASES",
    "UnlearningHistory",
    "build_unlearning_history",
    "unlearning_config",
]
