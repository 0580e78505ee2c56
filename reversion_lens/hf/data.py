"""Reading the ``[hf]`` table's data sources, and the rehearsal mix for ``control:rehearsal``."""

from typing import Any

import torch

from ..data import Batch
from ..probes import pad_sequences
from .config import Source

__all__ = ["read_prompts_from", "read_examples_from", "MixedBatchSource"]


def read_prompts_from(src: Source) -> list[str]:
    """The prompts of a :class:`~reversion_lens.hf.config.Source`."""
    from ..text import read_prompts

    where = {"where": src.where} if src.where else {}
    return read_prompts(src.path, prompt_field=src.field, split=src.split, limit=src.limit, **where)


def read_examples_from(src: Source) -> list[Any]:
    """The prompt/response pairs of a :class:`~reversion_lens.hf.config.Source`."""
    from ..text import read_examples

    where = {"where": src.where} if src.where else {}
    return read_examples(src.path, prompt_field=src.field, response_field=src.response_field, split=src.split,
                         limit=src.limit, **where)  # fmt: skip


class MixedBatchSource:
    """Batches with ``round(fraction * batch_size)`` rows from ``extra`` and the rest from ``main``.

    Both sources are deterministic in the step, so the mix is too (resumable; the same in every run of a
    seed). ``main``'s rows are its own batch's first rows: the benign part of a ``control:rehearsal`` batch is
    a prefix of the ``none`` arm's batch at the same step.
    """

    def __init__(self, main: Any, extra: Any, fraction: float):
        self.main, self.extra, self.fraction = main, extra, float(fraction)
        self.batch_size = main.batch_size
        self.n_extra = round(self.fraction * self.batch_size)

    def batch(self, step: int) -> Batch:
        a, b = self.main.batch(step), self.extra.batch(step)
        rows = []
        for src, n in ((a, self.batch_size - self.n_extra), (b, self.n_extra)):
            for i in range(min(n, src.tokens.shape[0])):
                keep = src.attention_mask[i].bool()
                rows.append((src.tokens[i][keep].tolist(), src.loss_mask[i][keep].tolist()))
        tokens, mask = pad_sequences([r[0] for r in rows], int(self.main.pad_id), "right")
        loss = torch.zeros_like(mask)
        for i, (_, lm) in enumerate(rows):
            loss[i, : len(lm)] = torch.tensor(lm, dtype=loss.dtype)
        return Batch(tokens, mask, loss)

    def describe(self) -> dict[str, Any]:
        return {"main": self.main.describe(), "extra": self.extra.describe(), "fraction": self.fraction}
