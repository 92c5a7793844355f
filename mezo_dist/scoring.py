"""Model-side scoring of task samples: candidate log-likelihoods, predictions, training losses
and in-context demonstrations (greedy generation lives in :mod:`mezo_dist.generation`, encodings
in :mod:`mezo_dist.encoding`; their public names are importable from here too).

Everything here calls the model only as ``forward(input_ids=..., attention_mask=...,
logits_to_keep=...)`` and reads ``.logits``, so it works the same on a plain Hugging Face model
and on any sharding wrapper (FSDP2, ZeRO-3) around one. Under a sharding wrapper every rank must
make the same number of forward calls: pass the same number of samples on every rank
(``candidate_loss`` with the default ``batch_size=None`` makes exactly one call).

What a forward computes is what is read (see :mod:`mezo_dist.encoding`): a sample whose
candidates are single tokens after the same prefix is one sequence, scored from the logits at
its answer position; other candidates are one sequence each; and the vocabulary head runs only at
the positions read. Sequences are right-padded, so padding never shifts a real token's position.
Log-probabilities are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch
from torch import nn

from mezo_dist.encoding import (  # noqa: F401  (public names of scoring before the split)
    BatchShape, Encoded, encode_pairs, pad_id, candidate_groups, encode_groups, encode_samples, encoded_shape,
    encoded_width, target_token_count,
)
from mezo_dist.errors import ConfigError
from mezo_dist.generation import greedy_generate, greedy_generate_ids  # noqa: F401
from mezo_dist.logits import Forward, kept_logits, support_logits_to_keep
from mezo_dist.metrics_text import accuracy, generation_scores
from mezo_dist.tasks.base import Sample

DEMO_SEPARATOR = "\n\n"


# ----------------------------------------------------------------------------------------- scoring
def continuation_logprobs(forward: Forward, tokenizer, enc: Encoded, *, device: torch.device | str,
                          batch_size: int | None,
                          pad_to: BatchShape | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per continuation of ``enc``: the summed log-probability of its tokens, and their count.

    Args:
        batch_size: rows per forward call; None runs every row in one call.
        pad_to: pad every call to at least this shape, so that ranks scoring different shares of
            one global batch run forwards of the same shape (the same kernels, the same rounding).
    """
    counts = torch.tensor(enc.lengths, dtype=torch.float32, device=device)
    if not enc.rows:
        return torch.zeros(0, device=device), counts
    bs = len(enc.rows) if batch_size is None else batch_size
    if bs < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(forward, nn.Module):
        support_logits_to_keep(forward)
    pad = pad_id(tokenizer)
    shape = enc.shape.cover(pad_to)
    values: list[torch.Tensor] = []
    owners: list[int] = []
    t = 0
    for lo in range(0, len(enc.rows), bs):
        rows = enc.rows[lo:lo + bs]
        input_ids = torch.full((len(rows), shape.width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), shape.width), dtype=torch.long)
        positions = torch.zeros((len(rows), shape.keep), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
            mask[i, :len(row.ids)] = 1
            # Unused slots repeat the last position read: any valid index would do.
            positions[i] = torch.tensor(row.positions + row.positions[-1:] * (shape.keep - len(row.positions)))
        logits = kept_logits(forward, input_ids.to(device), mask.to(device), positions.to(device)).float()
        # log p(token) = logit - logsumexp(logits): the full log-softmax is never materialised.
        norm = torch.logsumexp(logits, dim=-1)
        at: list[tuple[int, int, int]] = []
        while t < len(enc.tokens) and enc.tokens[t][0] < lo + len(rows):
            row, slot, token, owner = enc.tokens[t]
            at.append((row - lo, slot, token))
            owners.append(owner)
            t += 1
        r, s, tok = torch.tensor(at, dtype=torch.long, device=logits.device).unbind(1)
        values.append(logits[r, s, tok] - norm[r, s])
    flat = torch.cat(values)
    index = torch.tensor(owners, dtype=torch.long, device=flat.device)
    sums = torch.zeros(len(enc.lengths), dtype=flat.dtype, device=flat.device).index_add(0, index, flat)
    return sums, counts.to(flat.device)


def candidate_logprobs(forward: Forward, tokenizer, samples: Sequence[Sample], *, device: torch.device | str,
                       batch_size: int | None = 8, max_length: int | None = None,
                       masked_lm: bool = False) -> list[list[float]]:
    """Average per-token log-likelihood of each candidate given its sample's context.

    Args:
        forward: the model (or wrapper) to call.
        samples: classification or multiple-choice samples (generation samples have no candidates).
        device: where the input tensors go.
        batch_size: sequences per forward call (one per sample whose candidates are single
            tokens, else one per candidate); None scores everything in one call.
        max_length: cut longer prompts from the left; None keeps them whole.
        masked_lm: the model is a masked LM, scored at mask tokens (see :mod:`mezo_dist.encoding`).

    Returns:
        ``scores[i][j]``: mean log p(candidate j tokens | context) of sample i.
    """
    enc = encode_groups(tokenizer, candidate_groups(samples), max_length, masked_lm=masked_lm)
    with torch.no_grad():
        sums, counts = continuation_logprobs(forward, tokenizer, enc, device=device, batch_size=batch_size)
    return per_sample((sums / counts).tolist(), samples)


def per_sample(flat: Sequence[float], samples: Sequence[Sample]) -> list[list[float]]:
    """Candidate scores listed sample after sample, cut into one list per sample."""
    out, k = [], 0
    for s in samples:
        out.append(list(flat[k:k + len(s.candidates)]))
        k += len(s.candidates)
    return out


def predict(forward: Forward, tokenizer, samples: Sequence[Sample], *, device: torch.device | str,
            batch_size: int | None = 8, max_length: int | None = None, masked_lm: bool = False) -> list[int]:
    """Index of the highest-scoring candidate of each sample (ties go to the lower index)."""
    scores = candidate_logprobs(forward, tokenizer, samples, device=device, batch_size=batch_size,
                                max_length=max_length, masked_lm=masked_lm)
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def classification_loss(scores: torch.Tensor, samples: Sequence[Sample]) -> torch.Tensor:
    """Summed cross-entropy of each sample's gold candidate, with its candidates' scores (in
    sample order, ``len(s.candidates)`` each) as the logits."""
    # Accumulated in float64: per-sample terms agree across layouts, their sum must not
    # depend on how the samples were split over ranks (L+ - L- is divided by 2 eps).
    total, k = scores.new_zeros((), dtype=torch.float64), 0
    for s in samples:
        n = len(s.candidates)
        total = total - torch.log_softmax(scores[k:k + n], dim=0)[s.gold].double()
        k += n
    return total


def candidate_loss(forward: Forward, tokenizer, samples: Sequence[Sample], *, device: torch.device | str,
                   as_classification: bool, batch_size: int | None = None, max_length: int | None = None,
                   pad_to: BatchShape | int | None = None,
                   masked_lm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss as ``(sum, count)``, so the mean over ranks is ``all_reduce(sum) / all_reduce(count)``.

    Args:
        as_classification: if True, cross-entropy over each sample's candidates with the candidates'
            AVERAGE per-token log-likelihoods (what ``candidate_logprobs`` returns) as the logits;
            count = number of samples. If False, the negative log-likelihood of the gold target's
            tokens (the gold candidate, or ``answer_prefix + answers[0]`` for generation samples),
            summed over tokens; count = number of target tokens.
        batch_size: sequences per forward call; None scores everything in one call.
        pad_to: pad to at least this shape (see :func:`continuation_logprobs`); an int pads the
            width only. :func:`encoded_shape` of the global batch gives it.
        masked_lm: the model is a masked LM, scored at mask tokens.

    Gradients flow through the result when the caller enables them (first-order baselines);
    MeZO callers wrap the call in ``torch.no_grad()``.
    """
    if as_classification:
        for i, s in enumerate(samples):
            if s.is_generation:
                raise ConfigError(f"sample {i} has no candidates, so it cannot be trained as classification")
    if isinstance(pad_to, int):
        pad_to = BatchShape(pad_to, 0)
    enc = encode_samples(tokenizer, samples, as_classification=as_classification, max_length=max_length,
                         masked_lm=masked_lm)
    sums, counts = continuation_logprobs(forward, tokenizer, enc, device=device, batch_size=batch_size, pad_to=pad_to)
    if as_classification:
        total = classification_loss(sums / counts, samples)
        return total, torch.tensor(float(len(samples)), device=total.device)
    return -sums.double().sum(), counts.sum()


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
             batch_size: int = 8, max_new_tokens: int = 50, max_length: int | None = None,
             masked_lm: bool = False) -> dict[str, float]:
    """Score samples of one task: ``{"accuracy"}`` for candidates, ``{"f1", "exact_match"}`` for generation
    (``masked_lm``: the model is a masked LM, which scores candidates only)."""
    if not samples:
        raise ConfigError("no samples to evaluate")
    if all(s.is_generation for s in samples):
        preds = greedy_generate(forward, tokenizer, [s.context for s in samples], device=device,
                                max_new_tokens=max_new_tokens, max_length=max_length, batch_size=batch_size,
                                masked_lm=masked_lm)
        return generation_scores(preds, [s.answers for s in samples])
    if any(s.is_generation for s in samples):
        raise ConfigError("cannot evaluate generation and candidate samples together")
    preds = predict(forward, tokenizer, samples, device=device, batch_size=batch_size, max_length=max_length,
                    masked_lm=masked_lm)
    # is_correct also accepts alternative gold candidates (ReCoRD).
    return {"accuracy": accuracy([int(s.is_correct(p)) for s, p in zip(samples, preds)], [1] * len(samples))}
