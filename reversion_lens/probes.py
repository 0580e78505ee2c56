"""Probe sets: the prompts activations are read on, with their attention mask and read position(s).

A probe set is a padded token matrix plus a mask (1 = real token). Left and right padding are both
fine: the mask tells the model where the real tokens are (TransformerLens 4 then derives position ids
from it), and the *read weights* say which positions are averaged into each prompt's vector:

* ``read="last"`` (default): the last real token of each prompt (for chat prompts, the last prompt
  token, where the model decides how to answer);
* ``read="mean"``: the mean over all real tokens;
* ``read="span"`` with ``span=(start, stop)``: the mean over ``real_tokens[start:stop]`` with Python
  slice semantics (negative values count from the end of the real tokens).
"""

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import ProbeError

__all__ = ["ProbeSet", "ProbeBatch", "pad_sequences"]

READ_MODES = ("last", "mean", "span")


class ProbeBatch(NamedTuple):
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    weights: Float[Tensor, "batch pos"]  # read weights, each row sums to 1
    index: Int[Tensor, " batch"]  # row indices into the probe set


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int = 0, padding_side: str = "right"
) -> tuple[Int[Tensor, "prompt pos"], Int[Tensor, "prompt pos"]]:
    """Pad token lists into ``(tokens, attention_mask)``; ``padding_side`` is ``"left"`` or ``"right"``."""
    if padding_side not in ("left", "right"):
        raise ProbeError(f"padding_side must be 'left' or 'right', not {padding_side!r}.")
    if len(seqs) == 0:
        raise ProbeError("the probe set is empty; give at least one prompt.")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ProbeError(f"prompt {lengths.index(0)} has no tokens; drop empty prompts before building probes.")
    T = max(lengths)
    toks = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = torch.as_tensor(list(s), dtype=torch.long)
        if padding_side == "right":
            toks[i, : len(s)] = s
            mask[i, : len(s)] = 1
        else:
            toks[i, T - len(s) :] = s
            mask[i, T - len(s) :] = 1
    return toks, mask


@dataclass(frozen=True, eq=False)
class ProbeSet:
    """Padded prompts, their mask and where to read them. Build with :meth:`from_tokens` or :meth:`from_strings`."""

    tokens: Int[Tensor, "prompt pos"]
    attention_mask: Int[Tensor, "prompt pos"]
    read: str = "last"
    span: tuple[int, int] | None = None
    name: str = "probes"
    texts: tuple[str, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        toks, mask = self.tokens, self.attention_mask
        if not isinstance(toks, Tensor) or toks.ndim != 2:
            raise ProbeError(
                f"tokens must be a 2-D LongTensor [prompt, pos], got {getattr(toks, 'shape', type(toks))}."
            )
        if toks.shape[0] == 0 or toks.shape[1] == 0:
            raise ProbeError("the probe set is empty; give at least one prompt with at least one token.")
        if toks.dtype not in (torch.long, torch.int32, torch.int64):
            raise ProbeError(f"tokens must be integer ids, got dtype {toks.dtype}.")
        if not isinstance(mask, Tensor) or mask.shape != toks.shape:
            raise ProbeError(
                f"attention_mask shape {tuple(getattr(mask, 'shape', ()))} != tokens shape {tuple(toks.shape)}; "
                "pass a mask with 1 for real tokens and 0 for padding."
            )
        if ((mask != 0) & (mask != 1)).any():
            raise ProbeError("attention_mask must contain only 0 (padding) and 1 (real token).")
        if (toks < 0).any():
            raise ProbeError("token ids must be non-negative.")
        lengths = mask.sum(1)
        if (lengths == 0).any():
            i = int((lengths == 0).nonzero()[0])
            raise ProbeError(f"prompt {i} has no real tokens (its mask is all 0); drop it or fix its mask.")
        # Real tokens must be one contiguous run (left or right padding, not holes).
        first = mask.argmax(1)
        pos = torch.arange(mask.shape[1])
        contiguous = ((pos >= first[:, None]) & (pos < (first + lengths)[:, None])).long()
        if not torch.equal(contiguous, mask.long()):
            i = int((contiguous != mask.long()).any(1).nonzero()[0])
            raise ProbeError(
                f"prompt {i}'s attention mask has holes; padding must be all on the left or all on the right."
            )
        if self.read not in READ_MODES:
            raise ProbeError(f"read must be one of {READ_MODES}, not {self.read!r}.")
        if self.read == "span":
            if self.span is None or len(self.span) != 2:
                raise ProbeError("read='span' needs span=(start, stop) over the real tokens, e.g. (-3, None).")
        object.__setattr__(self, "tokens", toks.long())
        object.__setattr__(self, "attention_mask", mask.long())
        # Every prompt must have at least one read position.
        empty = self.read_weights().sum(1) == 0
        if empty.any():
            raise ProbeError(f"span {self.span} selects no tokens of prompt {int(empty.nonzero()[0])}; widen the span.")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_tokens(
        cls,
        tokens: Sequence[Sequence[int]] | Tensor,
        *,
        attention_mask: Tensor | None = None,
        pad_id: int | None = None,
        padding_side: str = "right",
        read: str = "last",
        span: tuple[int, int] | None = None,
        name: str = "probes",
        texts: Sequence[str] | None = None,
    ) -> "ProbeSet":
        """From token lists (padded here) or a token matrix.

        A matrix without ``attention_mask`` is taken as unpadded; if ``pad_id`` is given and the matrix
        looks padded (some rows start with it and no row ends with it: left padding; or some rows end
        with it and no row starts with it: right padding), that is an error, because padding without
        a mask silently changes every activation (left: TL4_GUIDE section 4) or reads a pad token
        instead of the prompt's last token (right).
        """
        if isinstance(tokens, Tensor):
            toks = tokens if tokens.ndim == 2 else tokens[None]
            if attention_mask is None:
                if pad_id is not None and (toks[:, 0] == pad_id).any() and (toks[:, -1] != pad_id).all():
                    raise ProbeError(
                        "these tokens look left-padded (rows start with pad_id) but no attention_mask was "
                        "given; left padding without a mask changes every activation. Pass attention_mask "
                        "(1 = real token) or build the probes from token lists with ProbeSet.from_tokens(lists)."
                    )
                if pad_id is not None and (toks[:, -1] == pad_id).any() and (toks[:, 0] != pad_id).all():
                    raise ProbeError(
                        "these tokens look right-padded (rows end with pad_id) but no attention_mask was "
                        "given; the pad tokens would be read as part of the prompts. Pass attention_mask "
                        "(1 = real token) or build the probes from token lists with ProbeSet.from_tokens(lists)."
                    )
                mask = torch.ones_like(toks, dtype=torch.long)
            else:
                mask = attention_mask
        else:
            toks, mask = pad_sequences(tokens, 0 if pad_id is None else pad_id, padding_side)
        return cls(toks, mask, read=read, span=span, name=name, texts=tuple(texts) if texts is not None else None)

    @classmethod
    def from_strings(
        cls,
        model: Any,
        strings: Sequence[str],
        *,
        padding_side: str = "left",
        prepend_bos: bool | None = None,
        read: str = "last",
        span: tuple[int, int] | None = None,
        name: str = "probes",
    ) -> "ProbeSet":
        """Tokenise each string with ``model.to_tokens`` (one at a time, so BOS handling is the model's own),
        then pad. Padding never changes a prompt's tokens, and the pad id never enters the mask."""
        if len(strings) == 0:
            raise ProbeError("the probe set is empty; give at least one prompt string.")
        if getattr(model, "tokenizer", None) is None:
            raise ProbeError(
                f"{type(model).__name__} has no tokenizer; build probes from tokens with ProbeSet.from_tokens."
            )
        kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        seqs = [model.to_tokens(s, **kw)[0].tolist() for s in strings]
        pad_id = model.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = model.tokenizer.eos_token_id or 0
        toks, mask = pad_sequences(seqs, pad_id, padding_side)
        return cls(toks, mask, read=read, span=span, name=name, texts=tuple(strings))

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def lengths(self) -> Int[Tensor, " prompt"]:
        return self.attention_mask.sum(1)

    def last_positions(self) -> Int[Tensor, " prompt"]:
        """Index of each prompt's last real token (left or right padding)."""
        T = self.attention_mask.shape[1]
        return T - 1 - self.attention_mask.flip(1).argmax(1)

    def read_weights(self) -> Float[Tensor, "prompt pos"]:
        """Weights over positions, each row summing to 1, that define each prompt's read-out vector."""
        mask = self.attention_mask
        if self.read == "last":
            w = torch.zeros(mask.shape, dtype=torch.float32)
            w[torch.arange(len(self)), self.last_positions()] = 1.0
            return w
        if self.read == "mean":
            sel = mask.float()
        else:
            start, stop = self.span  # type: ignore[misc]
            first = mask.argmax(1)
            lengths = mask.sum(1)
            rank = torch.arange(mask.shape[1])[None, :] - first[:, None]  # index among real tokens
            sel = torch.zeros(mask.shape)
            for i in range(len(self)):
                idx = list(range(int(lengths[i])))[slice(start, stop)]
                if idx:
                    sel[i] = (mask[i].bool() & torch.isin(rank[i], torch.tensor(idx))).float()
        total = sel.sum(1, keepdim=True)
        return torch.where(total > 0, sel / total.clamp_min(1), sel)

    def check_vocab(self, d_vocab: int) -> None:
        """Raise :class:`ProbeError` if a token id (real or padding) is outside ``[0, d_vocab)``."""
        bad = (self.tokens >= d_vocab) & self.attention_mask.bool()
        if bad.any():
            i, j = (int(x) for x in bad.nonzero()[0])
            raise ProbeError(
                f"token id {int(self.tokens[i, j])} (prompt {i}, position {j}) is outside the model's "
                f"vocabulary of {d_vocab}; the probes were tokenised for a different model."
            )
        pad = self.tokens >= d_vocab  # only padding is left: masked, but still embedded by the model
        if pad.any():
            i, j = (int(x) for x in pad.nonzero()[0])
            raise ProbeError(
                f"pad id {int(self.tokens[i, j])} (prompt {i}, position {j}) is outside the model's vocabulary of "
                f"{d_vocab}; padding is masked but still embedded. Pad with an id inside the vocabulary "
                "(e.g. pad_id=0 or the EOS id)."
            )

    def batches(self, batch_size: int = 32, *, by_length: bool = True) -> Iterator[ProbeBatch]:
        """Batches of at most ``batch_size`` prompts, each trimmed to the columns holding real tokens.

        ``by_length`` (default): the prompts are sorted by length (stably) and cut into consecutive
        chunks, shortest first, so a batch pays only for the padding of prompts of similar length; inside
        a batch the rows keep their probe-set order, and a probe set that fits in one batch is one batch in
        order. ``by_length=False``: consecutive prompts in probe-set order. Either way each batch's
        ``index`` holds its rows' indices into the probe set: place per-prompt outputs with it.
        """
        if batch_size < 1:
            raise ProbeError(f"batch_size must be >= 1, got {batch_size}.")
        weights = self.read_weights()
        n = len(self)
        if by_length and n > batch_size:
            order = torch.sort(self.lengths, stable=True).indices
            chunks = [order[s : s + batch_size].sort().values for s in range(0, n, batch_size)]
        else:
            chunks = [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        for idx in chunks:
            mask = self.attention_mask[idx]
            cols = mask.any(0).nonzero().squeeze(1)
            lo, hi = int(cols.min()), int(cols.max()) + 1
            yield ProbeBatch(self.tokens[idx, lo:hi], mask[:, lo:hi], weights[idx, lo:hi], idx)

    def padded_fraction(self, batch_size: int = 32, *, by_length: bool = True) -> float:
        """The share of the token positions in :meth:`batches` that are padding (what a forward pays for nothing)."""
        total = real = 0
        for b in self.batches(batch_size, by_length=by_length):
            total += b.attention_mask.numel()
            real += int(b.attention_mask.sum())
        return 1.0 - real / total

    def subset(self, index: Sequence[int] | Tensor) -> "ProbeSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        texts = tuple(self.texts[i] for i in idx.tolist()) if self.texts is not None else None
        return ProbeSet(self.tokens[idx], self.attention_mask[idx], self.read, self.span, self.name, texts)

    def hash(self) -> str:
        """A short content hash: the same prompts, padding and read positions give the same hash."""
        h = hashlib.sha256()
        lengths = self.lengths.tolist()
        for row, mrow in zip(self.tokens.tolist(), self.attention_mask.tolist()):
            h.update(bytes(str([t for t, m in zip(row, mrow) if m]), "utf-8"))
        h.update(repr((self.read, self.span, lengths)).encode())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "n": len(self), "read": self.read, "span": self.span, "hash": self.hash()}
