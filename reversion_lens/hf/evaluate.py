"""The ``[hf]`` setting's evaluation: refusal, harm and over-refusal rates from greedy responses (one judge,
:mod:`reversion_lens.judges`), and the held-out task loss; every judged response is returned for
``responses/step_<n>.jsonl``."""

import dataclasses
import math
from typing import Any

__all__ = ["make_evaluator", "check_judge"]


def check_judge(text: str) -> None:
    """Reject a malformed judge string now (model judges are only loaded when an evaluation runs)."""
    from ..errors import ConfigError

    head, sep, rest = text.partition(":")
    if text in ("refusal", "phrases") or (sep and head and rest):
        return
    raise ConfigError(f"judge {text!r}: use 'refusal', 'classifier:FOLDER', 'llm:MODEL' or 'package.module:name'.")


def make_evaluator(hf: Any, text_model: Any) -> Any:
    """``evaluate(model) -> {rates..., task_loss, task_accuracy, "responses": [...]}`` for an
    :class:`~reversion_lens.hf.config.HFConfig`'s evaluation sets, tokenised with ``text_model``."""
    from ..evaluation import heldout_loss
    from ..model_judges import parse_judge
    from ..responses import evaluate_responses
    from ..text import TextBatchSource, text_probes
    from .data import read_examples_from, read_prompts_from

    judge = parse_judge(hf.judge)

    def probes(src: Any, name: str) -> Any:
        return text_probes(text_model, read_prompts_from(src), chat=hf.chat, system=hf.system, name=name)

    harmful = probes(hf.eval_harmful, "eval_harmful") if hf.eval_harmful else None
    benign = probes(hf.eval_benign, "eval_benign") if hf.eval_benign else None
    heldout, n_batches = None, 0
    if hf.heldout is not None:
        examples = read_examples_from(hf.heldout)
        heldout = TextBatchSource(
            text_model, examples, batch_size=hf.batch_size, seed=0, chat=hf.chat, system=hf.system
        )
        n_batches = math.ceil(len(examples) / hf.batch_size)

    def evaluate(model: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        records: list[dict[str, Any]] = []
        if harmful is not None or benign is not None:
            judged = evaluate_responses(model, harmful, benign, judge, max_new_tokens=hf.max_new_tokens,
                                        batch_size=hf.eval_batch_size)  # fmt: skip
            out.update(judged.rates())
            records = [dataclasses.asdict(r) for r in judged.records]
        if heldout is not None:
            cost = heldout_loss(model, heldout, n_batches)
            out["task_loss"], out["task_accuracy"] = cost["loss"], cost["accuracy"]
        out["responses"] = records
        return out

    return evaluate
