"""The straightforward scoring that :mod:`mezo_dist.scoring` and :mod:`mezo_dist.generation` must
agree with: the oracle of the tests and the "before" of ``benchmarks/scoring.py``. Not used in
training or evaluation.

* Every candidate is its own sequence, right-padded, and the model computes full-vocabulary
  logits at every position.
* Greedy decoding goes one context at a time, without a key/value cache: every new token re-reads
  the whole prefix.

The encoding conventions are those of :mod:`mezo_dist.encoding`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mezo_dist.encoding import encode_pairs, pad_id, candidate_groups, prompt_ids
from mezo_dist.errors import ConfigError
from mezo_dist.logits import Forward
from mezo_dist.scoring import classification_loss, per_sample
from mezo_dist.tasks.base import Sample


def _logits(forward: Forward, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


def token_logprob_sums(forward: Forward, tokenizer, seqs: list[tuple[list[int], int]], *, device,
                       batch_size: int | None, pad_to: int | None = None,
                       masked_lm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ``(ids, start)`` sequence: the summed log-probability of its continuation tokens, and
    their count. ``pad_to`` pads every batch to at least that width; ``masked_lm`` scores each
    continuation at mask tokens."""
    if not seqs:
        z = torch.zeros(0, device=device)
        return z, z
    bs = len(seqs) if batch_size is None else batch_size
    if bs < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    pad = pad_id(tokenizer)
    sums: list[torch.Tensor] = []
    counts: list[int] = []
    for b in range(0, len(seqs), bs):
        chunk = seqs[b:b + bs]
        rows = [ids[:start] + [tokenizer.mask_token_id] * (len(ids) - start) + [tokenizer.sep_token_id]
                if masked_lm else ids for ids, start in chunk]
        width = max(max(len(r) for r in rows), pad_to or 0)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        logits = _logits(forward, input_ids.to(device), mask.to(device))
        for i, (ids, start) in enumerate(chunk):
            at = slice(start, len(ids)) if masked_lm else slice(start - 1, len(ids) - 1)
            logp = torch.log_softmax(logits[i, at].float(), dim=-1)
            target = torch.tensor(ids[start:], dtype=torch.long, device=logp.device)
            sums.append(logp.gather(-1, target[:, None]).sum())
            counts.append(len(ids) - start)
    return torch.stack(sums), torch.tensor(counts, dtype=torch.float32, device=sums[0].device)


def sequence_width(tokenizer, samples: Sequence[Sample], *, as_classification: bool,
                   max_length: int | None = None, masked_lm: bool = False) -> int:
    """The longest per-candidate sequence (what ``pad_to`` is for a global batch)."""
    pairs = _pairs(samples, as_classification)
    extra = 1 if masked_lm else 0  # the closing [SEP]
    encoded = encode_pairs(tokenizer, pairs, max_length, masked_lm=masked_lm)
    return max((len(ids) + extra for ids, _ in encoded), default=0)


def _pairs(samples: Sequence[Sample], as_classification: bool) -> list[tuple[str, str]]:
    if as_classification:
        return [(c, x) for c, xs in candidate_groups(samples) for x in xs]
    return [(s.context, s.target) for s in samples]


def candidate_logprobs(forward: Forward, tokenizer, samples: Sequence[Sample], *, device,
                       batch_size: int = 8, max_length: int | None = None,
                       masked_lm: bool = False) -> list[list[float]]:
    """``scores[i][j]``: mean log p(candidate j's tokens | context) of sample i."""
    with torch.no_grad():
        seqs = encode_pairs(tokenizer, _pairs(samples, True), max_length, masked_lm=masked_lm)
        sums, counts = token_logprob_sums(forward, tokenizer, seqs, device=device, batch_size=batch_size,
                                          masked_lm=masked_lm)
    return per_sample((sums / counts).tolist(), samples)


def candidate_loss(forward: Forward, tokenizer, samples: Sequence[Sample], *, device, as_classification: bool,
                   batch_size: int | None = None, max_length: int | None = None,
                   pad_to: int | None = None, masked_lm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of the training loss, as :func:`mezo_dist.scoring.candidate_loss` defines it."""
    seqs = encode_pairs(tokenizer, _pairs(samples, as_classification), max_length, masked_lm=masked_lm)
    sums, counts = token_logprob_sums(forward, tokenizer, seqs, device=device, batch_size=batch_size, pad_to=pad_to,
                                      masked_lm=masked_lm)
    if not as_classification:
        return -sums.double().sum(), counts.sum()
    total = classification_loss(sums / counts, samples)
    return total, torch.tensor(float(len(samples)), device=total.device)


def greedy_one(forward: Forward, tokenizer, context: str, *, device, max_new_tokens: int, stop: str | None,
               max_length: int | None) -> tuple[list[int], str]:
    """Greedy continuation of one context: (kept token ids, text cut before the stop string)."""
    ids = prompt_ids(tokenizer, context, max_new_tokens=max_new_tokens, max_length=max_length)
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


def greedy_generate(forward: Forward, tokenizer, contexts: Sequence[str], *, device, max_new_tokens: int = 50,
                    stop: str | None = "\n", max_length: int | None = None) -> list[tuple[list[int], str]]:
    """:func:`greedy_one` of each context: (token ids, stripped text)."""
    with torch.no_grad():
        out = [greedy_one(forward, tokenizer, c, device=device, max_new_tokens=max_new_tokens, stop=stop,
                          max_length=max_length) for c in contexts]
    return [(ids, text.strip()) for ids, text in out]
