"""Task evaluation (accuracy, or SQuAD-style F1 and exact match) on a model that may be sharded.

Under FSDP2 and ZeRO-3 every forward pass is collective (parameters are gathered inside it), so
every rank must make the same number of forward calls, although ranks score different samples and
greedy generation stops at different lengths. Each rank therefore scores its share (samples r,
r + W, r + 2W, ...) with the helpers of :mod:`mezo_dist.scoring` while counting its forward calls,
the ranks agree on the largest count (one MAX all-reduce), the ranks that made fewer run dummy
forwards up to it, and one SUM all-reduce of (count, correct, f1 sum, exact-match sum) gives every
rank the metrics of the whole list, the same as one process computes (up to float64 summation
order for F1 and exact match; accuracy exactly).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from mezo_dist.errors import ConfigError
from mezo_dist.metrics_text import exact_match, f1
from mezo_dist.placement.base import Placement
from mezo_dist.scoring import _encode_pairs, greedy_generate, predict
from mezo_dist.tasks.base import Sample


def _world(placement: Placement) -> int:
    """Ranks to coordinate with; 1 means no collective is issued."""
    if placement.state.world_size > 1 and not dist.is_initialized():
        raise RuntimeError(f"state says {placement.state.world_size} ranks but no process group is started")
    return dist.get_world_size() if dist.is_initialized() else 1


def balance_forwards(placement: Placement, calls: int, *, token_id: int = 0,
                     num_samples: int | None = None) -> int:
    """Run dummy forwards until this rank has made as many forward calls as the busiest rank.

    Collective: every rank must call it once, after its own forwards. One MAX all-reduce finds the
    largest ``calls`` over ranks, then this rank runs ``max - calls`` forwards of a 1x1 input
    (``token_id``, which must be a valid id) under ``torch.no_grad()``: each joins the parameter
    gathers the other ranks' real forwards issue. Without a process group, or with one rank,
    nothing is issued.

    Args:
        calls: forward calls this rank made since the ranks were last in step.
        num_samples: if given, also checks in the same all-reduce that every rank was given the
            same number of samples (raises ``ValueError`` on every rank otherwise, before any
            dummy forward, so no rank is left waiting).

    Returns:
        The number of forward calls every rank has made after balancing.
    """
    if _world(placement) == 1:
        return calls
    n = 0 if num_samples is None else num_samples
    # max(n) and max(-n) together are max and min: they agree only if every rank passed the same n.
    t = torch.tensor([calls, n, -n], dtype=torch.long, device=placement.state.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    target, n_max, neg_n_min = (int(v) for v in t.tolist())
    if n_max != -neg_n_min:
        raise ValueError(f"ranks were given different numbers of samples (from {-neg_n_min} to {n_max})")
    if calls > target:  # cannot happen with a consistent all-reduce; guard against misuse
        raise RuntimeError(f"rank {placement.state.rank} made {calls} forwards, more than the maximum {target}")
    if calls < target:
        x = torch.full((1, 1), token_id, dtype=torch.long, device=placement.state.device)
        with torch.no_grad():
            for _ in range(target - calls):
                placement.forward(input_ids=x, attention_mask=torch.ones_like(x))
    return target


def _dummy_token(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def evaluate_task(
    placement: Placement,
    tokenizer,
    samples: Sequence[Sample],
    *,
    metric_prefix: str = "eval",
    batch_size: int = 8,
    max_new_tokens: int = 50,
    max_length: int | None = None,
    predictions: dict[int, Any] | None = None,
) -> dict[str, float]:
    """Metrics of ``samples`` (one task, one kind) on the placed model; the same dict on every rank.

    Collective: every rank must call it with the same ``samples`` (checked by count). Candidate
    samples give ``{prefix}_accuracy`` (``Sample.is_correct``, so ReCoRD's alternatives count);
    generation samples (no candidates) give ``{prefix}_f1`` and ``{prefix}_exact_match`` from
    greedy decoding; both add ``{prefix}_count``, the number of samples. Arguments as in
    :func:`mezo_dist.scoring.evaluate`; ``batch_size`` counts sample x candidate sequences.

    Args:
        predictions: if given, filled with this rank's predictions by index in ``samples``
            (candidate index, or generated text); for inspection, never all-reduced.
    """
    if not samples:
        raise ConfigError("no samples to evaluate")
    generation = all(s.is_generation for s in samples)
    if not generation and any(s.is_generation for s in samples):
        raise ConfigError("cannot evaluate generation and candidate samples together")
    if not generation:
        # Encode every sample on every rank first: a sample the helpers refuse (a candidate that
        # does not fit max_length) must stop all ranks together, not one rank while the others
        # wait inside a forward's parameter gather.
        _encode_pairs(tokenizer, [(s.context, c) for s in samples for c in s.candidates], max_length)
    if generation and max_length is not None and max_length <= max_new_tokens:
        raise ConfigError(f"max_length={max_length} leaves no room for the prompt and {max_new_tokens} new tokens")

    state = placement.state
    world = _world(placement)
    rank = state.rank if world > 1 else 0
    index = list(range(rank, len(samples), world))
    share = [samples[i] for i in index]

    calls = 0

    def counted(**batch: Any) -> Any:
        nonlocal calls
        calls += 1
        return placement.forward(**batch)

    placement.eval()
    correct = f1_sum = em_sum = 0.0
    with torch.no_grad():
        if generation:
            preds: list[Any] = greedy_generate(counted, tokenizer, [s.context for s in share], device=state.device,
                                               max_new_tokens=max_new_tokens, max_length=max_length)
            for s, p in zip(share, preds):
                f1_sum += f1(p, s.answers)
                em_sum += exact_match(p, s.answers)
        else:
            preds = predict(counted, tokenizer, share, device=state.device, batch_size=batch_size,
                            max_length=max_length)
            correct = float(sum(int(s.is_correct(p)) for s, p in zip(share, preds)))
        if predictions is not None:
            predictions.update(zip(index, preds))
        balance_forwards(placement, calls, token_id=_dummy_token(tokenizer), num_samples=len(samples))

    # One SUM all-reduce of the per-rank sums; float64 keeps integer counts exact.
    totals = torch.tensor([len(share), correct, f1_sum, em_sum], dtype=torch.float64, device=state.device)
    if world > 1:
        placement.all_reduce_sum(totals)
    count, correct, f1_sum, em_sum = totals.tolist()
    if int(count) != len(samples):
        raise RuntimeError(f"ranks scored {int(count)} samples in all, expected {len(samples)}")
    out = {"f1": f1_sum / count, "exact_match": em_sum / count} if generation else {"accuracy": correct / count}
    result = {f"{metric_prefix}_{k}": v for k, v in out.items()}
    result[f"{metric_prefix}_count"] = float(len(samples))
    return result
