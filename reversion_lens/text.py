"""Text probes and text fine-tuning data: chat templates, tokens, padded probe sets, fine-tuning batches.

Sources (:func:`read_prompts`, :func:`read_examples`, :func:`parse_where`, :class:`Example`) live in
:mod:`reversion_lens.sources` and are re-exported here: .txt, .jsonl, .json, .csv files and ``hf:``
data sets, with field names and a ``where`` row filter.

Chat templates: with ``chat="auto"`` (default) a prompt is wrapped as one user turn by the model's
tokenizer template when it has one (``apply_chat_template(..., add_generation_prompt=True)``) and used
as plain text otherwise; ``chat=True`` demands a template, ``chat=False`` never uses one. Templated text
is tokenised with ``add_special_tokens=False`` (the template writes its own BOS); plain text goes through
``model.to_tokens``, exactly as :meth:`ProbeSet.from_strings` does, so the model's own BOS convention
applies. Either way the probe read position is the prompt's last token, after templating: for a chat
model, the end of the assistant header, where it decides how to answer.

Fine-tuning batches (:class:`TextBatchSource`) put the prompt, then the response, right-padded; the loss
mask is 1 on the response tokens only (for chat models: the assistant turn as the template writes it,
end-of-turn token included; for plain text: the response then EOS).
"""

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .data import Batch, pad_token_id
from .errors import ProbeError
from .probes import ProbeSet, pad_sequences
from .sources import Example, parse_where, read_examples, read_prompts

__all__ = [
    "Example",
    "parse_where",
    "read_prompts",
    "read_examples",
    "has_chat_template",
    "use_chat",
    "render_prompt",
    "encode_prompt",
    "encode_example",
    "text_probes",
    "TextBatchSource",
]


# ------------------------------------------------------------------ chat templates and tokens
def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ProbeError(
            f"{type(model).__name__} has no tokenizer, so text cannot be tokenised; load a model with a "
            "tokenizer or build probes from tokens with ProbeSet.from_tokens."
        )
    return tok


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(model: Any, chat: bool | str = "auto") -> bool:
    """Resolve ``chat`` (``"auto"``, ``True``/``"on"``, ``False``/``"off"``) for ``model``'s tokenizer."""
    tok = _tokenizer(model)
    if chat in ("auto", None):
        return has_chat_template(tok)
    if chat in (True, "on", "true", "yes"):
        if not has_chat_template(tok):
            raise ProbeError(
                "chat=True but the model's tokenizer has no chat template; use chat='auto' or False, or load "
                "the chat (aligned) model's tokenizer."
            )
        return True
    if chat in (False, "off", "false", "no"):
        return False
    raise ProbeError(f"chat must be 'auto', True or False, not {chat!r}.")


def _messages(prompt: str, system: str | None, response: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def render_prompt(model: Any, prompt: str, *, chat: bool | str = "auto", system: str | None = None) -> str:
    """The prompt as the model sees it: chat-templated with the generation prompt, or unchanged."""
    if not use_chat(model, chat):
        if system:
            raise ProbeError("a system prompt needs a chat template; drop system= or use a chat model.")
        return prompt
    try:
        return _tokenizer(model).apply_chat_template(
            _messages(prompt, system), tokenize=False, add_generation_prompt=True
        )
    except Exception as e:  # jinja raises TemplateError, e.g. for a system turn the template forbids
        raise ProbeError(f"the chat template rejected this prompt ({type(e).__name__}: {e}).") from e


def _n_ctx(model: Any) -> int | None:
    return getattr(getattr(model, "cfg", None), "n_ctx", None)


def encode_prompt(model: Any, prompt: str, *, chat: bool | str = "auto", system: str | None = None) -> list[int]:
    """Token ids of one prompt: ``model.to_tokens`` for plain text (the model's BOS convention), or the
    templated text with ``add_special_tokens=False`` (the template holds its own special tokens)."""
    if use_chat(model, chat):
        ids = _tokenizer(model)(render_prompt(model, prompt, chat=True, system=system), add_special_tokens=False)[
            "input_ids"
        ]
    else:
        if system:
            raise ProbeError("a system prompt needs a chat template; drop system= or use a chat model.")
        ids = model.to_tokens(prompt, truncate=False, move_to_device=False)[0].tolist()
    n_ctx = _n_ctx(model)
    if not ids:
        raise ProbeError(f"prompt {prompt[:40]!r} tokenises to nothing; drop empty prompts.")
    if n_ctx is not None and len(ids) > n_ctx:
        raise ProbeError(
            f"prompt {prompt[:40]!r}... is {len(ids)} tokens, longer than the model's context of {n_ctx}; shorten it."
        )
    return list(ids)


def text_probes(
    model: Any,
    prompts: Sequence[str],
    *,
    chat: bool | str = "auto",
    system: str | None = None,
    padding_side: str = "left",
    read: str = "last",
    span: tuple[int, int] | None = None,
    name: str = "probes",
) -> ProbeSet:
    """A :class:`ProbeSet` from prompt strings: templated when the model has a chat template (``chat="auto"``),
    left-padded with a mask, read at each prompt's last token.

    Without a template the tokens are exactly those of ``ProbeSet.from_strings(model, prompts)``.
    """
    if len(prompts) == 0:
        raise ProbeError("the probe set is empty; give at least one prompt string.")
    seqs = [encode_prompt(model, p, chat=chat, system=system) for p in prompts]
    return ProbeSet.from_tokens(
        seqs,
        pad_id=pad_token_id(_tokenizer(model)),
        padding_side=padding_side,
        read=read,
        span=span,
        name=name,
        texts=list(prompts),
    )


def encode_example(
    model: Any,
    example: Example,
    *,
    chat: bool | str = "auto",
    system: str | None = None,
    max_len: int | None = None,
) -> tuple[list[int], int]:
    """``(token ids, n_prompt)``: the prompt's ids then the response's; ids from ``n_prompt`` on are the
    response (the loss targets).

    Chat: the response is the assistant turn as the template writes it (end-of-turn included), taken as the
    suffix of the templated conversation after the templated prompt; if the template does not extend the
    prompt that way, the response text plus EOS. Plain text: the response text verbatim (include a leading
    space if your tokenizer needs one) plus EOS. Responses are cut to fit ``max_len`` (default ``n_ctx``).
    """
    tok = _tokenizer(model)
    chat_on = use_chat(model, chat)
    prompt_ids = encode_prompt(model, example.prompt, chat=chat_on, system=system)
    eos = [] if tok.eos_token_id is None else [int(tok.eos_token_id)]
    response_ids: list[int] | None = None
    if chat_on:
        full = tok.apply_chat_template(_messages(example.prompt, system, example.response), tokenize=False)
        full_ids = tok(full, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
            response_ids = list(full_ids[len(prompt_ids) :])
    if response_ids is None:
        response_ids = list(tok(example.response, add_special_tokens=False)["input_ids"]) + eos
    limit = max_len if max_len is not None else _n_ctx(model)
    if limit is not None and len(prompt_ids) + len(response_ids) > limit:
        keep = limit - len(prompt_ids)
        if keep < 1:
            raise ProbeError(
                f"example prompt {example.prompt[:40]!r}... leaves no room for a response within {limit} tokens; "
                "shorten it or raise max_len."
            )
        response_ids = response_ids[:keep]
    return prompt_ids + response_ids, len(prompt_ids)


class TextBatchSource:
    """Fine-tuning batches from prompt/response examples: ``batch(step) -> Batch``, deterministic in
    ``(seed, step)``.

    Examples are drawn without replacement in a fresh permutation per epoch (``numpy`` generator seeded
    with ``[seed, epoch]``), so step ``s`` always sees the same examples, whatever ran before (resumable,
    paired across arms). Rows are right-padded; ``loss_mask`` is 1 on response tokens only.

    Args:
        model: gives the tokenizer, BOS convention and chat template (the model being fine-tuned).
        examples: :class:`Example` list (see :func:`read_examples`).
        batch_size: examples per step.
        seed: the data order.
        chat, system: as for :func:`encode_example`.
        max_len: token budget per example (default the model's ``n_ctx``).
    """

    def __init__(
        self,
        model: Any,
        examples: Sequence[Example],
        *,
        batch_size: int = 8,
        seed: int = 0,
        chat: bool | str = "auto",
        system: str | None = None,
        max_len: int | None = None,
    ):
        if len(examples) == 0:
            raise ProbeError("no fine-tuning examples; give at least one prompt/response pair.")
        if batch_size < 1:
            raise ProbeError(f"batch_size must be >= 1, got {batch_size}.")
        self.examples = list(examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.chat = use_chat(model, chat)
        self.pad_id = pad_token_id(_tokenizer(model))
        self._encoded = [
            encode_example(model, ex, chat=self.chat, system=system, max_len=max_len) for ex in self.examples
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def indices(self, step: int) -> list[int]:
        """Indices of the examples in batch ``step`` (0-based)."""
        if step < 0:
            raise ProbeError(f"step must be >= 0, got {step}.")
        n, out = len(self.examples), []
        perms: dict[int, np.ndarray] = {}
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch = k // n
            if epoch not in perms:
                perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(int(perms[epoch][k % n]))
        return out

    def batch(self, step: int) -> Batch:
        rows = [self._encoded[i] for i in self.indices(step)]
        tokens, mask = pad_sequences([ids for ids, _ in rows], self.pad_id, "right")
        loss_mask = torch.zeros_like(mask)
        for b, (ids, n_prompt) in enumerate(rows):
            loss_mask[b, n_prompt : len(ids)] = 1
        return Batch(tokens, mask, loss_mask)

    def hash(self) -> str:
        """Content hash of the encoded examples and the batching (recorded in results)."""
        h = hashlib.sha256(repr((self.batch_size, self.seed)).encode())
        for ids, n_prompt in self._encoded:
            h.update(repr((ids, n_prompt)).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "n": len(self),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "chat": self.chat,
            "hash": self.hash(),
        }
