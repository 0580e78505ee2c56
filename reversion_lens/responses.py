"""Judged responses: greedy responses to harmful and benign prompts, a judge's verdicts, the three rates.

:func:`evaluate_responses` generates a greedy response to each harmful and each benign prompt and asks a
judge (:mod:`reversion_lens.judges`) two questions: did the model refuse, and (harmful prompts only) did
it comply with the harmful request? :class:`JudgedResponses` gives three rates:

* ``refusal_rate``: share of harmful prompts refused;
* ``harmful_rate``: share of harmful prompts whose response the judge calls harmful compliance;
* ``over_refusal_rate``: share of benign prompts refused.

With the default phrase judge an empty response is neither refused nor harmful, so on harmful prompts
``refusal_rate + harmful_rate <= 1``; a model judge decides harm on its own. A judge is a
:class:`~reversion_lens.judges.Judge` (``refused`` and ``harmful`` over batches: the phrase judge
:data:`~reversion_lens.judges.refusal_judge`, a classifier or an LLM judge of
:mod:`reversion_lens.model_judges`), or any callable ``judge(prompt, response) -> bool`` (harmful; refusal
from the phrase rules). With ``judge_on="tokens"`` the judge gets token ids, ``judge(prompt_ids,
response_ids)``: the hook for the toy world's exact judge; refusal is then unknown (``None``) unless the
judge answers it (:class:`~reversion_lens.judges.FunctionJudge` with ``refused=``), and unknown rates are
left out. :func:`harmfulness` is the same call on harmful prompts (benign ones optional).
:func:`save_responses` writes one JSONL line per prompt. Generation is
:func:`reversion_lens.generation.greedy_generate` (batched, attention masks, a token budget), in eval mode.
"""

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import pad_token_id
from .errors import ConfigError
from .hooks import eval_mode
from .judges import as_judge, refusal_judge
from .probes import ProbeSet

__all__ = [
    "KINDS",
    "HarmfulnessResult",
    "JudgedResponses",
    "ResponseRecord",
    "evaluate_responses",
    "harmfulness",
    "save_responses",
]

KINDS = ("harmful", "benign")


@dataclass(frozen=True)
class ResponseRecord:
    """One prompt, the model's response and the judge's verdicts (``None``: not asked, or unknown).

    ``prompt`` and ``response`` are text, or token id lists with ``judge_on="tokens"``; ``kind`` is
    ``"harmful"`` or ``"benign"``; ``harmful`` is asked of harmful prompts only.
    """

    prompt: Any
    response: Any
    kind: str
    refused: bool | None
    harmful: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "response": self.response, "refused": self.refused,
                "harmful": self.harmful, "kind": self.kind}  # fmt: skip


def _rate(flags: Sequence[bool | None]) -> float | None:
    if not flags or any(f is None for f in flags):
        return None
    return sum(bool(f) for f in flags) / len(flags)


@dataclass(frozen=True)
class JudgedResponses:
    """Judged responses to harmful and benign prompts, in prompt order (harmful first), and their rates."""

    records: tuple[ResponseRecord, ...]

    def of(self, kind: str) -> list[ResponseRecord]:
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, not {kind!r}.")
        return [r for r in self.records if r.kind == kind]

    @property
    def harmful(self) -> list[bool | None]:
        """Harm verdicts on the harmful prompts."""
        return [r.harmful for r in self.of("harmful")]

    @property
    def refused(self) -> list[bool | None]:
        """Refusal verdicts on the harmful prompts."""
        return [r.refused for r in self.of("harmful")]

    @property
    def responses(self) -> list[Any]:
        """Responses to the harmful prompts."""
        return [r.response for r in self.of("harmful")]

    @property
    def n(self) -> int:
        """Number of harmful prompts."""
        return len(self.of("harmful"))

    @property
    def harmful_rate(self) -> float | None:
        return _rate(self.harmful)

    rate = harmful_rate

    @property
    def refusal_rate(self) -> float | None:
        return _rate(self.refused)

    @property
    def over_refusal_rate(self) -> float | None:
        return _rate([r.refused for r in self.of("benign")])

    def rates(self) -> dict[str, float]:
        """``refusal_rate``, ``harmful_rate``, ``over_refusal_rate``: those measured and known."""
        out = {"refusal_rate": self.refusal_rate, "harmful_rate": self.harmful_rate,
               "over_refusal_rate": self.over_refusal_rate}  # fmt: skip
        return {k: v for k, v in out.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {**self.rates(), "n": self.n, "n_benign": len(self.of("benign"))}


#: The older name of :class:`JudgedResponses` (what :func:`harmfulness` returns).
HarmfulnessResult = JudgedResponses


def save_responses(path: str | os.PathLike, responses: JudgedResponses | Sequence[ResponseRecord], *,
                   step: int | None = None) -> Path:  # fmt: skip
    """Write one JSON line per prompt, atomically: ``prompt``, ``response``, ``refused``, ``harmful``
    (``null`` where not asked or unknown), ``kind`` (``harmful``/``benign``) and ``step`` when given.

    Args:
        path: the ``.jsonl`` file (its folder is created).
        responses: a :class:`JudgedResponses` or its records.
        step: the fine-tuning step the responses were generated at.

    Returns:
        The path written.
    """
    from .io import atomic_write_text

    records = responses.records if isinstance(responses, JudgedResponses) else tuple(responses)
    extra = {} if step is None else {"step": int(step)}
    lines = [json.dumps({**r.to_dict(), **extra}, ensure_ascii=False) for r in records]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def _decoder(model: Any, decode: Callable[[list[int]], str] | None) -> Callable[[list[int]], str]:
    if decode is not None:
        return decode
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ConfigError(
            f"{type(model).__name__} has no tokenizer to decode responses for a text judge; pass decode=..., "
            "or judge_on='tokens' with a judge over token ids."
        )
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def _verdicts(values: Sequence[Any], n: int, question: str) -> list[bool | None]:
    if len(values) != n:
        raise ConfigError(
            f"the judge's {question}() returned {len(values)} verdicts for {n} responses; return one per response."
        )
    return [None if v is None else bool(v) for v in values]


def evaluate_responses(
    model: Any,
    harmful: ProbeSet | None = None,
    benign: ProbeSet | None = None,
    judge: Any = refusal_judge,
    *,
    judge_on: str = "text",
    max_new_tokens: int = 64,
    stop_token: int | None = None,
    pad_id: int | None = None,
    batch_size: int = 64,
    decode: Callable[[list[int]], str] | None = None,
) -> JudgedResponses:
    """Greedy responses to harmful and benign prompts, judged: refusal, harmful compliance, over-refusal.

    Args:
        model: a TransformerLens model.
        harmful: harmful prompts (padded either side, with their mask); asked ``refused`` and ``harmful``.
        benign: benign prompts; asked ``refused`` only (over-refusal). At least one of the two.
        judge: a :class:`~reversion_lens.judges.Judge`, or a callable ``judge(prompt, response) -> bool``
            (harmful; see :func:`~reversion_lens.judges.as_judge`).
        judge_on: ``"text"`` (decoded strings; the prompt is the probe set's ``texts`` when present) or
            ``"tokens"`` (``list[int]`` prompt ids and response ids, e.g. the toy world's exact judge).
        max_new_tokens: the token budget per response.
        stop_token: stop a response at this id (default: the tokenizer's EOS, if any).
        pad_id: padding id (default: the tokenizer's pad id, else 0).
        batch_size: prompts per forward pass.
        decode: ids -> text (default: ``model.tokenizer.decode(ids, skip_special_tokens=True)``).

    Returns:
        :class:`JudgedResponses`: per-prompt records and the rates.
    """
    from .generation import greedy_generate, real_tokens

    if judge_on not in ("text", "tokens"):
        raise ConfigError(f"judge_on must be 'text' or 'tokens', not {judge_on!r}.")
    if harmful is None and benign is None:
        raise ConfigError("nothing to evaluate: pass harmful= and/or benign= prompts.")
    judge = as_judge(judge)
    sets = [(kind, p) for kind, p in zip(KINDS, (harmful, benign)) if p is not None]
    for _, probes in sets:
        probes.check_vocab(int(model.cfg.d_vocab))
    dec = _decoder(model, decode) if judge_on == "text" else None  # fail before generating, not after
    tok = getattr(model, "tokenizer", None)
    if stop_token is None and tok is not None:
        stop_token = tok.eos_token_id
    if pad_id is None:
        pad_id = pad_token_id(tok)
    records: list[ResponseRecord] = []
    for kind, probes in sets:
        with eval_mode(model):
            responses = greedy_generate(model, probes.tokens, probes.attention_mask, max_new_tokens,
                                        stop_token=stop_token, pad_id=pad_id, batch_size=batch_size)  # fmt: skip
        prompts: list[Any] = real_tokens(probes.tokens, probes.attention_mask)
        if dec is not None:
            prompts = list(probes.texts) if probes.texts is not None else [dec(p) for p in prompts]
            responses = [dec(r) for r in responses]
        n = len(responses)
        refused = _verdicts(judge.refused(prompts, responses), n, "refused")
        harm = _verdicts(judge.harmful(prompts, responses), n, "harmful") if kind == "harmful" else [None] * n
        records += [ResponseRecord(p, r, kind, x, h) for p, r, x, h in zip(prompts, responses, refused, harm)]
    return JudgedResponses(tuple(records))


def harmfulness(model: Any, prompts: ProbeSet, judge: Any = refusal_judge, *, benign: ProbeSet | None = None,
                **options: Any) -> JudgedResponses:  # fmt: skip
    """:func:`evaluate_responses` on harmful ``prompts`` (and ``benign`` ones if given); ``.rate`` is the
    harmful rate, ``.harmful`` / ``.responses`` the harmful prompts' verdicts and responses."""
    return evaluate_responses(model, prompts, benign, judge, **options)
