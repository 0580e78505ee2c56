"""The ``[hf]`` setting's evaluation: harm, refusal and over-refusal rates from greedy responses, and the
held-out task loss, with every response kept for ``responses/step_<n>.jsonl``."""

import math
from typing import Any

__all__ = ["make_evaluator"]


def _judge(text: str) -> Any:
    if text == "refusal":
        from ..evaluation import refusal_judge

        return refusal_judge
    import importlib

    module, _, attr = text.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def make_evaluator(hf: Any, text_model: Any) -> Any:
    """``evaluate(model) -> {metrics..., "responses": [...]}`` for an :class:`~reversion_lens.hf.config.HFConfig`'s
    evaluation sets, tokenised with ``text_model`` (its tokenizer and chat template)."""
    from ..evaluation import harmfulness, heldout_loss, is_refusal
    from ..text import TextBatchSource, text_probes
    from .data import read_examples_from, read_prompts_from

    judge = _judge(hf.judge)

    def probes(src: Any, name: str) -> Any:
        return text_probes(text_model, read_prompts_from(src), chat=hf.chat, system=hf.system, name=name)

    harmful = probes(hf.eval_harmful, "eval_harmful") if hf.eval_harmful else None
    benign = probes(hf.eval_benign, "eval_benign") if hf.eval_benign else None
    heldout = None
    if hf.heldout is not None:
        examples = read_examples_from(hf.heldout)
        heldout = TextBatchSource(text_model, examples, batch_size=hf.batch_size, seed=0, chat=hf.chat, system=hf.system)
        n_batches = math.ceil(len(examples) / hf.batch_size)
    gen = dict(max_new_tokens=hf.max_new_tokens, batch_size=hf.eval_batch_size)

    def evaluate(model: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        responses: list[dict[str, Any]] = []
        if harmful is not None:
            res = harmfulness(model, harmful, judge, **gen)
            refused = [is_refusal(r) for r in res.responses]
            out["harmful_rate"] = res.rate
            out["refusal_rate"] = sum(refused) / len(refused)
            responses += [{"kind": "harmful", "prompt": p, "response": r, "harmful": h, "refused": f}
                          for p, r, h, f in zip(harmful.texts, res.responses, res.harmful, refused)]  # fmt: skip
        if benign is not None:
            res = harmfulness(model, benign, judge, **gen)
            refused = [is_refusal(r) for r in res.responses]
            out["over_refusal_rate"] = sum(refused) / len(refused)
            responses += [{"kind": "benign", "prompt": p, "response": r, "refused": f}
                          for p, r, f in zip(benign.texts, res.responses, refused)]  # fmt: skip
        if heldout is not None:
            cost = heldout_loss(model, heldout, n_batches)
            out["task_loss"], out["task_accuracy"] = cost["loss"], cost["accuracy"]
        out["responses"] = responses
        return out

    return evaluate
