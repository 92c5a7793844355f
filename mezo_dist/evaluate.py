"""Task evaluation (accuracy, or SQuAD-style F1 and exact match) on a model that may be sharded.

Under FSDP2 and ZeRO-3 every forward pass is collective (parameters are gathered inside it), so
every rank must make the same number of forward calls, although ranks score different samples and
greedy generation stops at different lengths. Each rank scores its share (samples r, r + W,
r + 2W, ...) with the helpers of :mod:`mezo_dist.scoring` through a :class:`BalancedForward`,
which keeps the ranks' forwards in step and lets a rank that is done join the others' remaining
forwards with dummy ones. One SUM all-reduce of (count, correct, f1 sum, exact-match sum) then
gives every rank the metrics of the whole list, as one process computes them (accuracy exactly;
F1 and exact match up to the float64 summation order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mezo_dist.errors import ConfigError
from mezo_dist.metrics_text import exact_match, f1
from mezo_dist.placement.base import Placement
from mezo_dist.encoding import candidate_groups, encode_groups, prompt_ids
from mezo_dist.generation import greedy_generate, supports_kv_cache
from mezo_dist.scoring import predict
from mezo_dist.tasks.base import Sample


def _world(placement: Placement) -> int:
    """Ranks to coordinate with; 1 means no collective is issued."""
    state = placement.state
    if state.world_size > 1 and not state.grouped:
        raise RuntimeError(f"state says {state.world_size} ranks but no process group is started")
    return state.world_size if state.grouped else 1


class BalancedForward:
    """``placement.forward`` for ranks that make different numbers of forward calls.

    Under FSDP2 and ZeRO-3 a forward gathers parameters collectively, so a rank that has run out
    of work must keep joining the forwards of the others; and the ranks cannot compare their
    call counts *after* the fact, because a rank with more calls would then sit in a parameter
    gather while the others sit in the count's all-reduce (a deadlock). So the ranks go in
    rounds: before each real forward a rank all-reduces (MAX) "I want a forward"; once done,
    :meth:`finish` answers "no" and runs a dummy forward (1x1 input of ``token_id``, under
    ``torch.no_grad()``) every round in which another rank still wants one, until none does.
    Each round costs one all-reduce of three integers next to the forward's own gathers; every
    rank makes max-over-ranks forward calls. Without a process group, or with one rank, it is
    the plain forward and issues no collective.

    Args:
        token_id: a valid token id for the dummy forwards.
        num_samples: if given, every round also checks that all ranks were given the same number
            of samples, and raises ``ValueError`` on every rank at the first round otherwise.
    """

    def __init__(self, placement: Placement, *, token_id: int = 0, num_samples: int | None = None) -> None:
        self.placement = placement
        self.token_id = token_id
        self.num_samples = 0 if num_samples is None else num_samples
        self.world = _world(placement)
        self.calls = 0  # real forwards of this rank
        self.dummies = 0  # balancing forwards of this rank

    def _anyone_wants(self, want: bool) -> bool:
        n = self.num_samples
        # max(n) and max(-n) give max and min: they agree only if every rank passed the same n.
        t = torch.tensor([int(want), n, -n], dtype=torch.long, device=self.placement.state.device)
        self.placement.state.all_reduce_max(t)
        wanted, n_max, neg_n_min = (int(v) for v in t.tolist())
        if n_max != -neg_n_min:
            raise ValueError(f"ranks were given different numbers of samples (from {-neg_n_min} to {n_max})")
        return bool(wanted)

    def __call__(self, **batch: Any) -> Any:
        if self.world > 1:
            self._anyone_wants(True)  # the others learn that a round is on
        self.calls += 1
        return self.placement.forward(**batch)

    def finish(self) -> int:
        """Collective: join the other ranks' remaining forwards; returns the dummy forwards run."""
        if self.world == 1:
            return 0
        x = torch.full((1, 1), self.token_id, dtype=torch.long, device=self.placement.state.device)
        with torch.no_grad():
            while self._anyone_wants(False):
                self.placement.forward(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
                self.dummies += 1
        return self.dummies


def dummy_token(tokenizer) -> int:
    """A valid token id for the balancing forwards of :class:`BalancedForward`."""
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
    masked_lm: bool = False,
) -> dict[str, float]:
    """Metrics of ``samples`` (one task, one kind) on the placed model; the same dict on every rank.

    Collective: every rank must call it with the same ``samples`` (checked by count). Candidate
    samples give ``{prefix}_accuracy`` (``Sample.is_correct``, so ReCoRD's alternatives count);
    generation samples (no candidates) give ``{prefix}_f1`` and ``{prefix}_exact_match`` from
    greedy decoding; both add ``{prefix}_count``, the number of samples. Arguments as in
    :func:`mezo_dist.scoring.evaluate`; ``batch_size`` counts the sequences of a forward (one
    per sample whose candidates are single tokens, else one per candidate; one per context when
    decoding).

    Args:
        predictions: if given, filled with this rank's predictions by index in ``samples``
            (candidate index, or generated text); for inspection, never all-reduced.
        masked_lm: the model is a masked LM (scored at mask tokens; it cannot generate).
    """
    if not samples:
        raise ConfigError("no samples to evaluate")
    generation = all(s.is_generation for s in samples)
    if not generation and any(s.is_generation for s in samples):
        raise ConfigError("cannot evaluate generation and candidate samples together")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not generation:
        # Encode every sample on every rank first: a sample the helpers refuse (a candidate that
        # does not fit max_length) must stop all ranks together, not one rank while the others
        # wait inside a forward's parameter gather.
        encode_groups(tokenizer, candidate_groups(samples), max_length, masked_lm=masked_lm)
    else:
        for s in samples:
            prompt_ids(tokenizer, s.context, max_new_tokens=max_new_tokens, max_length=max_length,
                       masked_lm=masked_lm)

    state = placement.state
    world = _world(placement)
    rank = state.rank if world > 1 else 0
    index = list(range(rank, len(samples), world))
    share = [samples[i] for i in index]

    forward = BalancedForward(placement, token_id=dummy_token(tokenizer), num_samples=len(samples))
    placement.eval()
    correct = f1_sum = em_sum = 0.0
    with torch.no_grad():
        if generation:
            preds: list[Any] = greedy_generate(forward, tokenizer, [s.context for s in share], device=state.device,
                                               max_new_tokens=max_new_tokens, max_length=max_length,
                                               batch_size=batch_size, use_cache=supports_kv_cache(placement.module))
            for s, p in zip(share, preds):
                f1_sum += f1(p, s.answers)
                em_sum += exact_match(p, s.answers)
        else:
            preds = predict(forward, tokenizer, share, device=state.device, batch_size=batch_size,
                            max_length=max_length, masked_lm=masked_lm)
            correct = float(sum(int(s.is_correct(p)) for s, p in zip(share, preds)))
        if predictions is not None:
            predictions.update(zip(index, preds))
        forward.finish()

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
