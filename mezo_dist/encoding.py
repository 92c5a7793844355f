"""Token encodings of task samples: which sequences a forward runs and where its logits are read.

Conventions (shared by scoring, generation and the reference implementation they are tested
against):

* A continuation's tokens are the tokens of ``context + continuation`` after the longest prefix
  they share with the tokens of ``context`` alone (with most tokenizers: after the context's tokens).
* Long prompts are cut from the left (keeping a leading BOS token) when ``max_length`` is set.
* Masked LMs (RoBERTa-style, the paper's second family): the continuation's tokens are replaced by
  mask tokens, ``[CLS] context [MASK] ... [SEP]``, and each is scored by the model's prediction at
  its own position. Every function here takes ``masked_lm`` explicitly: whether the model is one
  (``models.is_masked_lm`` of its config, read once where the model is loaded).

A *row* is one sequence of a forward and the positions whose logits it needs. When every
continuation of a group (a sample's candidates) is one token after the same prefix, as with the
paper's verbalizers, the group shares one row: all candidates are read from the logits at the
answer position. Otherwise each continuation has its own row. A causal row leaves out its last
token: nothing is predicted from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mezo_dist.errors import ConfigError
from mezo_dist.tasks.base import Sample


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0  # any id works: padded positions are masked and never scored


def _left_truncate(ids: list[int], max_length: int, bos_id: int | None) -> tuple[list[int], int]:
    """Drop tokens after a leading BOS until ``len(ids) <= max_length``; returns (ids, dropped)."""
    cut = len(ids) - max_length
    if cut <= 0:
        return ids, 0
    head = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    return ids[:head] + ids[head + cut:], cut


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int | None, *,
                 masked_lm: bool = False) -> list[tuple[list[int], int]]:
    """Token ids of ``context + continuation`` and the index where the continuation's tokens start.

    For a masked LM (``masked_lm``) the ids are ``[CLS] context continuation`` (no special tokens
    from the tokenizer); the scorer masks the continuation and closes the sequence with ``[SEP]``.
    """
    if not pairs:
        return []
    if masked_lm:
        if None in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id):
            raise ConfigError("a masked LM's tokenizer needs cls, sep and mask tokens")
        # [CLS] leads (kept by truncation like a BOS); one position stays free for the [SEP].
        lead, room, bos = [tokenizer.cls_token_id], 1, tokenizer.cls_token_id
    else:
        lead, room, bos = [], 0, tokenizer.bos_token_id
    contexts = tokenizer([c for c, _ in pairs], add_special_tokens=not masked_lm)["input_ids"]
    fulls = tokenizer([c + x for c, x in pairs], add_special_tokens=not masked_lm)["input_ids"]
    out = []
    for (context, cont), ctx, full in zip(pairs, contexts, fulls):
        ctx, full = list(ctx), list(full)
        start = 0
        # Longest common prefix: a tokenizer may merge the context's last characters with the
        # continuation's first ones, and then the merged token belongs to the continuation.
        while start < min(len(ctx), len(full)) and ctx[start] == full[start]:
            start += 1
        if start >= len(full):
            raise ConfigError(f"continuation {cont!r} adds no tokens to its context")
        ids, start = lead + full, start + len(lead)
        if start == 0:
            raise ConfigError("a context must encode to at least one token (nothing predicts the first token)")
        if max_length is not None:
            limit = max_length - room
            if len(ids) - start > limit - 1:
                raise ConfigError(f"continuation of {len(ids) - start} tokens does not fit max_length={max_length}")
            ids, cut = _left_truncate(ids, limit, bos)
            start -= cut
        out.append((ids, start))
    return out


def prompt_ids(tokenizer, context: str, *, max_new_tokens: int, max_length: int | None,
               masked_lm: bool = False) -> list[int]:
    """Token ids of a generation prompt, cut from the left so that ``max_new_tokens`` still fit
    (a masked LM, ``masked_lm``, is refused)."""
    if masked_lm:
        raise ConfigError("generation needs a causal LM; a masked LM scores candidates only")
    ids = list(tokenizer(context, add_special_tokens=True)["input_ids"])
    if max_length is not None:
        if max_length <= max_new_tokens:
            raise ConfigError(f"max_length={max_length} leaves no room for the prompt and {max_new_tokens} new tokens")
        ids, _ = _left_truncate(ids, max_length - max_new_tokens, tokenizer.bos_token_id)
    return ids


# --------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One sequence of a forward: its token ids and the positions whose logits are read."""

    ids: list[int]
    positions: list[int]


@dataclass(frozen=True)
class BatchShape:
    """A forward's padded shape: ``width`` tokens per row, ``keep`` logit positions per row.

    Ranks that score different shares of one global batch pad to the global batch's shape, so
    that every rank runs the forward one process would run, row for row.
    """

    width: int
    keep: int

    def cover(self, other: "BatchShape | None") -> "BatchShape":
        """The smallest shape that holds both."""
        if other is None:
            return self
        return BatchShape(max(self.width, other.width), max(self.keep, other.keep))


@dataclass
class Encoded:
    """Rows of a forward and the tokens to read from them.

    ``tokens[i] = (row, slot, token_id, continuation)``: the log-probability of ``token_id`` at the
    ``slot``-th kept position of ``row`` belongs to continuation ``continuation``; ``lengths[c]``
    counts continuation ``c``'s tokens. Tokens are listed in row order.
    """

    rows: list[Row]
    tokens: list[tuple[int, int, int, int]]
    lengths: list[int]

    @property
    def shape(self) -> BatchShape:
        return BatchShape(max((len(r.ids) for r in self.rows), default=0),
                          max((len(r.positions) for r in self.rows), default=0))


def encode_groups(tokenizer, groups: Sequence[tuple[str, Sequence[str]]], max_length: int | None, *,
                  masked_lm: bool = False) -> Encoded:
    """Rows scoring each ``(context, continuations)`` group; continuations are numbered in order.

    A group whose continuations are all one token after the same prefix shares one row (its
    scores are read at one position); any other continuation gets a row of its own.
    """
    pairs = [(context, cont) for context, conts in groups for cont in conts]
    encoded = encode_pairs(tokenizer, pairs, max_length, masked_lm=masked_lm)
    out = Encoded(rows=[], tokens=[], lengths=[])
    k = 0
    for _, conts in groups:
        mine = encoded[k:k + len(conts)]
        base = k
        k += len(conts)
        if not mine:
            continue
        prefix = mine[0][0][:mine[0][1]]
        if all(len(ids) - start == 1 and ids[:start] == prefix for ids, start in mine):
            row = len(out.rows)
            out.rows.append(_row(prefix, 1, masked_lm, tokenizer))
            for j, (ids, start) in enumerate(mine):
                out.tokens.append((row, 0, ids[start], base + j))
                out.lengths.append(1)
            continue
        for j, (ids, start) in enumerate(mine):
            row = len(out.rows)
            n = len(ids) - start
            out.rows.append(_row(ids[:start], n, masked_lm, tokenizer, tail=ids[start:-1]))
            out.tokens.extend((row, i, t, base + j) for i, t in enumerate(ids[start:]))
            out.lengths.append(n)
    return out


def _row(prefix: list[int], n: int, masked: bool, tokenizer, tail: list[int] = ()) -> Row:
    """The row scoring ``n`` tokens after ``prefix``; ``tail`` holds all but the last of them."""
    start = len(prefix)
    if masked:
        # Each masked position predicts its own token.
        ids = prefix + [tokenizer.mask_token_id] * n + [tokenizer.sep_token_id]
        return Row(ids=ids, positions=list(range(start, start + n)))
    # A causal LM's logits at t predict token t + 1; the last token predicts nothing.
    return Row(ids=prefix + list(tail), positions=list(range(start - 1, start - 1 + n)))


def candidate_groups(samples: Sequence[Sample]) -> list[tuple[str, list[str]]]:
    """Each sample's context with its candidates (refusing generation samples)."""
    for i, s in enumerate(samples):
        if s.is_generation:
            raise ConfigError(f"sample {i} has no candidates (a generation sample); use greedy_generate")
    return [(s.context, s.candidates) for s in samples]


def target_groups(samples: Sequence[Sample]) -> list[tuple[str, list[str]]]:
    """Each sample's context with its gold target alone."""
    return [(s.context, [s.target]) for s in samples]


def encode_samples(tokenizer, samples: Sequence[Sample], *, as_classification: bool,
                   max_length: int | None = None, masked_lm: bool = False) -> Encoded:
    """Rows of ``candidate_loss``: every candidate (``as_classification``) or the gold target."""
    groups = candidate_groups(samples) if as_classification else target_groups(samples)
    return encode_groups(tokenizer, groups, max_length, masked_lm=masked_lm)


def encoded_shape(tokenizer, samples: Sequence[Sample], *, as_classification: bool,
                  max_length: int | None = None, masked_lm: bool = False) -> BatchShape:
    """The padded shape of ``samples``' rows: what ``pad_to`` should be for a global batch whose
    shares are scored on different ranks."""
    return encode_samples(tokenizer, samples, as_classification=as_classification, max_length=max_length,
                          masked_lm=masked_lm).shape


def encoded_width(tokenizer, samples: Sequence[Sample], *, as_classification: bool,
                  max_length: int | None = None, masked_lm: bool = False) -> int:
    """The longest row of ``samples`` (the width of :func:`encoded_shape`)."""
    return encoded_shape(tokenizer, samples, as_classification=as_classification, max_length=max_length,
                         masked_lm=masked_lm).width


def target_token_count(tokenizer, samples: Sequence[Sample], *, max_length: int | None = None,
                       masked_lm: bool = False) -> int:
    """How many gold-target tokens ``candidate_loss(..., as_classification=False)`` sums over,
    known without a forward."""
    pairs = [(s.context, s.target) for s in samples]
    return sum(len(ids) - start for ids, start in encode_pairs(tokenizer, pairs, max_length, masked_lm=masked_lm))
