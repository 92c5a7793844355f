"""Model-side scoring of task samples: candidate log-likelihoods, predictions, training losses,
greedy generation and in-context demonstrations.

Everything here calls the model only as ``forward(input_ids=..., attention_mask=...)`` and reads
``.logits``, so it works the same on a plain Hugging Face causal LM and on any sharding wrapper
(FSDP2, ZeRO-3) around one. Under a sharding wrapper every rank must make the same number of
forward calls: pass the same number of samples on every rank (``candidate_loss`` with the default
``batch_size=None`` makes exactly one call).

Conventions:

* A candidate's tokens are the tokens of ``context + candidate`` after the longest prefix they
  share with the tokens of ``context`` alone (with most tokenizers: after the context's tokens).
* Sequences are right-padded, so padding never shifts a real token's position.
* Log-probabilities are computed in float32 whatever the model's dtype.
* Long prompts are cut from the left (keeping a leading BOS token) when ``max_length`` is set.
* Masked LMs (RoBERTa-style, the paper's second family): the candidate's tokens are replaced by
  mask tokens, ``[CLS] context [MASK] ... [SEP]``, and each is scored by the model's prediction at
  its own position; the paper's verbalizers are single words, one mask each.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mezo_dist.errors import ConfigError
from mezo_dist.metrics_text import accuracy, generation_scores
from mezo_dist.tasks.base import Sample

Forward = Callable[..., Any]
DEMO_SEPARATOR = "\n\n"


# ----------------------------------------------------------------------------------------- encoding
def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0  # any id works: padded positions are masked and never scored


def is_masked_lm(tokenizer) -> bool:
    """Set by :func:`mezo_dist.models.load_tokenizer` when the model is a masked LM."""
    return bool(getattr(tokenizer, "mezo_masked_lm", False))


def _left_truncate(ids: list[int], max_length: int, bos_id: int | None) -> tuple[list[int], int]:
    """Drop tokens after a leading BOS until ``len(ids) <= max_length``; returns (ids, dropped)."""
    cut = len(ids) - max_length
    if cut <= 0:
        return ids, 0
    head = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    return ids[:head] + ids[head + cut:], cut


def encoded_width(tokenizer, samples: Sequence[Sample], *, as_classification: bool,
                  max_length: int | None = None) -> int:
    """The longest encoded (context, continuation) of ``samples``: what ``pad_to`` should be for a
    global batch whose shares are scored on different ranks."""
    if as_classification:
        pairs = [(s.context, c) for s in samples for c in s.candidates]
    else:
        pairs = [(s.context, s.target) for s in samples]
    extra = 1 if is_masked_lm(tokenizer) else 0  # the closing [SEP]
    return max((len(ids) + extra for ids, _ in _encode_pairs(tokenizer, pairs, max_length)), default=0)


def target_token_count(tokenizer, samples: Sequence[Sample], *, max_length: int | None = None) -> int:
    """How many gold-target tokens ``candidate_loss(..., as_classification=False)`` sums over,
    known without a forward."""
    pairs = [(s.context, s.target) for s in samples]
    return sum(len(ids) - start for ids, start in _encode_pairs(tokenizer, pairs, max_length))


def _encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int | None) -> list[tuple[list[int], int]]:
    """Token ids of ``context + continuation`` and the index where the continuation's tokens start.

    For a masked LM the ids are ``[CLS] context continuation`` (no special tokens from the
    tokenizer); the scorer masks the continuation and closes the sequence with ``[SEP]``.
    """
    if not pairs:
        return []
    masked = is_masked_lm(tokenizer)
    if masked:
        if None in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id):
            raise ConfigError("a masked LM's tokenizer needs cls, sep and mask tokens")
        # [CLS] leads (kept by truncation like a BOS); one position stays free for the [SEP].
        lead, room, bos = [tokenizer.cls_token_id], 1, tokenizer.cls_token_id
    else:
        lead, room, bos = [], 0, tokenizer.bos_token_id
    contexts = tokenizer([c for c, _ in pairs], add_special_tokens=not masked)["input_ids"]
    fulls = tokenizer([c + x for c, x in pairs], add_special_tokens=not masked)["input_ids"]
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


def _logits(forward: Forward, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # No key/value cache: every call scores whole sequences (greedy decoding re-reads the prefix).
    out = forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def _token_logprob_sums(forward: Forward, tokenizer, seqs: list[tuple[list[int], int]], *, device,
                        batch_size: int | None, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its continuation tokens, and their count.

    ``pad_to`` pads every batch to at least that width, so that ranks scoring different shares
    of one global batch run forwards of the same shape (the same kernels, the same rounding).
    """
    if not seqs:
        z = torch.zeros(0, device=device)
        return z, z
    bs = len(seqs) if batch_size is None else batch_size
    if bs < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    pad = _pad_id(tokenizer)
    masked = is_masked_lm(tokenizer)
    sums: list[torch.Tensor] = []
    counts: list[int] = []
    for b in range(0, len(seqs), bs):
        chunk = seqs[b:b + bs]
        rows = [ids[:start] + [tokenizer.mask_token_id] * (len(ids) - start) + [tokenizer.sep_token_id]
                if masked else ids for ids, start in chunk]
        width = max(max(len(r) for r in rows), pad_to or 0)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = _logits(forward, input_ids, mask)
        for i, (ids, start) in enumerate(chunk):
            # A causal LM's logits at t predict token t + 1; a masked LM's predict the masked token t.
            at = slice(start, len(ids)) if masked else slice(start - 1, len(ids) - 1)
            logp = torch.log_softmax(logits[i, at].float(), dim=-1)
            target = torch.tensor(ids[start:], dtype=torch.long, device=logp.device)
            sums.append(logp.gather(-1, target[:, None]).sum())
            counts.append(len(ids) - start)
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float32, device=sums[0].device)


# ----------------------------------------------------------------------------------------- scoring
def candidate_logprobs(forward: Forward, tokenizer, samples: Sequence[Sample], *, device: torch.device | str,
                       batch_size: int = 8, max_length: int | None = None) -> list[list[float]]:
    """Average per-token log-likelihood of each candidate given its sample's context.

    Args:
        forward: the causal LM (or wrapper) to call.
        samples: classification or multiple-choice samples (generation samples have no candidates).
        device: where the input tensors go.
        batch_size: sequences (sample x candidate pairs) per forward call.
        max_length: cut longer prompts from the left; None keeps them whole.

    Returns:
        ``scores[i][j]``: mean log p(candidate j tokens | context) of sample i.
    """
    for i, s in enumerate(samples):
        if s.is_generation:
            raise ConfigError(f"sample {i} has no candidates (a generation sample); use greedy_generate")
    pairs = [(s.context, c) for s in samples for c in s.candidates]
    with torch.no_grad():
        sums, counts = _token_logprob_sums(forward, tokenizer, _encode_pairs(tokenizer, pairs, max_length),
                                           device=device, batch_size=batch_size)
        flat = (sums / counts).tolist()
    out, k = [], 0
    for s in samples:
        out.append(flat[k:k + len(s.candidates)])
        k += len(s.candidates)
    return out


def predict(forward: Forward, tokenizer, samples: Sequence[Sample], *, device: torch.device | str,
            batch_size: int = 8, max_length: int | None = None) -> list[int]:
    """Index of the highest-scoring candidate of each sample (ties go to the lower index)."""
    scores = candidate_logprobs(forward, tokenizer, samples, device=device, batch_size=batch_size,
                                max_length=max_length)
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def candidate_loss(forward: Forward, tokenizer, samples: Sequence[Sample], *, device: torch.device | str,
                   as_classification: bool, batch_size: int | None = None,
                   max_length: int | None = None, pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss as ``(sum, count)``, so the mean over ranks is ``all_reduce(sum) / all_reduce(count)``.

    Args:
        as_classification: if True, cross-entropy over each sample's candidates with the candidates'
            AVERAGE per-token log-likelihoods (what ``candidate_logprobs`` returns) as the logits;
            count = number of samples. If False, the negative log-likelihood of the gold target's
            tokens (the gold candidate, or ``answer_prefix + answers[0]`` for generation samples),
            summed over tokens; count = number of target tokens.
        batch_size: sequences per forward call; None scores everything in one call.
        pad_to: pad to at least this width (see ``_token_logprob_sums``).

    Gradients flow through the result when the caller enables them (first-order baselines);
    MeZO callers wrap the call in ``torch.no_grad()``.
    """
    if as_classification:
        for i, s in enumerate(samples):
            if s.is_generation:
                raise ConfigError(f"sample {i} has no candidates, so it cannot be trained as classification")
        pairs = [(s.context, c) for s in samples for c in s.candidates]
        sums, counts = _token_logprob_sums(forward, tokenizer, _encode_pairs(tokenizer, pairs, max_length),
                                           device=device, batch_size=batch_size, pad_to=pad_to)
        scores = sums / counts
        # Accumulated in float64: per-sample terms agree across layouts, their sum must not
        # depend on how the samples were split over ranks (L+ - L- is divided by 2 eps).
        total, k = scores.new_zeros((), dtype=torch.float64), 0
        for s in samples:
            n = len(s.candidates)
            total = total - torch.log_softmax(scores[k:k + n], dim=0)[s.gold].double()
            k += n
        return total, torch.tensor(float(len(samples)), device=total.device)
    pairs = [(s.context, s.target) for s in samples]
    sums, counts = _token_logprob_sums(forward, tokenizer, _encode_pairs(tokenizer, pairs, max_length),
                                       device=device, batch_size=batch_size, pad_to=pad_to)
    return -sums.double().sum(), counts.sum()


# --------------------------------------------------------------------------------------- generation
def _greedy_one(forward: Forward, tokenizer, context: str, *, device, max_new_tokens: int, stop: str | None,
                max_length: int | None) -> tuple[list[int], str]:
    if is_masked_lm(tokenizer):
        raise ConfigError("generation needs a causal LM; a masked LM scores candidates only")
    ids = list(tokenizer(context, add_special_tokens=True)["input_ids"])
    if max_length is not None:
        if max_length <= max_new_tokens:
            raise ConfigError(f"max_length={max_length} leaves no room for the prompt and {max_new_tokens} new tokens")
        ids, _ = _left_truncate(ids, max_length - max_new_tokens, tokenizer.bos_token_id)
    eos = tokenizer.eos_token_id
    new: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        x = torch.tensor([ids + new], dtype=torch.long, device=device)
        nxt = int(_logits(forward, x, torch.ones_like(x))[0, -1].float().argmax())
        if eos is not None and nxt == eos:
            break
        candidate = tokenizer.decode(new + [nxt], skip_special_tokens=True)
        if stop and stop in candidate:
            # The token that brings the stop string is not kept, but the text before it is.
            text = candidate[:candidate.index(stop)]
            break
        new.append(nxt)
        text = candidate
    return new, text


def greedy_generate_ids(forward: Forward, tokenizer, contexts: Sequence[str], *, device: torch.device | str,
                        max_new_tokens: int = 50, stop: str | None = "\n",
                        max_length: int | None = None) -> list[list[int]]:
    """Token ids that ``greedy_generate`` keeps for each context (the stop token excluded)."""
    with torch.no_grad():
        return [_greedy_one(forward, tokenizer, c, device=device, max_new_tokens=max_new_tokens, stop=stop,
                            max_length=max_length)[0] for c in contexts]


def greedy_generate(forward: Forward, tokenizer, contexts: Sequence[str], *, device: torch.device | str,
                    max_new_tokens: int = 50, stop: str | None = "\n", max_length: int | None = None) -> list[str]:
    """Greedy continuation of each context, without a KV cache (one full forward per new token).

    Contexts are decoded one at a time, so no padding is involved and any position-embedding
    scheme is right. Decoding stops at EOS, at ``max_new_tokens``, or where the decoded text first
    contains ``stop`` (the text is cut there). Returns the continuations, whitespace-stripped.
    """
    with torch.no_grad():
        return [_greedy_one(forward, tokenizer, c, device=device, max_new_tokens=max_new_tokens, stop=stop,
                            max_length=max_length)[1].strip() for c in contexts]


# ------------------------------------------------------------------------------------ demonstrations
def demonstrations(train_samples: Sequence[Sample], k: int, seed: int, *, separator: str = DEMO_SEPARATOR) -> str:
    """In-context demonstrations: ``k`` training samples drawn with ``random.Random(seed)``, each
    written as its context followed by its gold target, joined by ``separator`` (a blank line,
    as in the paper's ICL runs with OPT). ``k == 0`` gives an empty string."""
    if not 0 <= k <= len(train_samples):
        raise ConfigError(f"cannot draw {k} demonstrations from {len(train_samples)} training samples")
    picked = random.Random(seed).sample(range(len(train_samples)), k)
    return separator.join(train_samples[i].context + train_samples[i].target for i in picked)


def with_demonstrations(sample: Sample, demos: str, *, separator: str = DEMO_SEPARATOR) -> Sample:
    """A copy of ``sample`` whose context starts with ``demos`` (unchanged when ``demos`` is empty)."""
    if not demos:
        return sample
    return dataclasses.replace(sample, context=demos + separator + sample.context)


# ----------------------------------------------------------------------------------------- evaluation
def evaluate(forward: Forward, tokenizer, samples: Sequence[Sample], *, device: torch.device | str,
             batch_size: int = 8, max_new_tokens: int = 50, max_length: int | None = None) -> dict[str, float]:
    """Score samples of one task: ``{"accuracy"}`` for candidates, ``{"f1", "exact_match"}`` for generation."""
    if not samples:
        raise ConfigError("no samples to evaluate")
    if all(s.is_generation for s in samples):
        preds = greedy_generate(forward, tokenizer, [s.context for s in samples], device=device,
                                max_new_tokens=max_new_tokens, max_length=max_length)
        return generation_scores(preds, [s.answers for s in samples])
    if any(s.is_generation for s in samples):
        raise ConfigError("cannot evaluate generation and candidate samples together")
    preds = predict(forward, tokenizer, samples, device=device, batch_size=batch_size, max_length=max_length)
    # is_correct also accepts alternative gold candidates (ReCoRD).
    return {"accuracy": accuracy([int(s.is_correct(p)) for s, p in zip(samples, preds)], [1] * len(samples))}
