"""What a MeZO step minimises: the causal-LM loss of text, or a task's loss or metric.

An objective turns a step number into this rank's share of the global batch and that share into
a closure for :meth:`MeZO.step`. The global order depends on the run seed and the global batch
only, so every world size sees the same examples at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mezo_dist.data import GlobalOrder, TextBatches
from mezo_dist.placement.base import Placement
from mezo_dist.tasks.base import Sample

Closure = Callable[[], Any]


@dataclass(frozen=True)
class MicroBatch:
    """One forward's worth of this rank's share of a step.

    ``weight`` (tokens or examples) is known before the forward: backpropagation divides every
    micro-batch's loss sum by the global weight of the whole step, so that gradients accumulated
    over micro-batches and ranks equal the gradient of the global mean, however the step is split.
    """

    loss: Closure  # -> (sum of losses, weight), both 0-d tensors
    weight: float


def _split_rows(n: int, parts: int) -> list[tuple[int, int]]:
    size = n // parts
    return [(k * size, (k + 1) * size) for k in range(parts)]


def summed(micro: list[MicroBatch]) -> Closure:
    """One closure over all micro-batches (MeZO's accumulation: one perturbation, many forwards)."""
    if len(micro) == 1:
        return micro[0].loss

    def closure():
        total, weight = 0.0, 0.0
        for mb in micro:
            t, w = mb.loss()
            total, weight = total + t, weight + w
        return total, weight

    return closure


def causal_lm_loss(placement: Placement, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, number of target tokens) on this rank's micro-batch."""
    # use_cache=False: a training forward has no use for every layer's keys and values, and
    # keeping them until the end of the forward costs memory that inference would not hold.
    logits = placement.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    )
    # Summed in float64: per-token losses agree bit for bit across layouts, and a float64 sum
    # keeps the order of summation (1 process vs N ranks) from showing up in L+ - L-.
    return per_token.double().sum(), (targets != -100).sum()


class TextObjective:
    """Next-token loss over a JSON Lines file of texts."""

    unit = "tokens"

    def __init__(self, batches: TextBatches, device: torch.device, *, accumulation: int = 1) -> None:
        # ``batches`` yields this rank's share of a step (micro-batch x accumulation rows).
        self.batches, self.device, self.accumulation = batches, device, accumulation

    def micro_batches(self, placement: Placement, step: int) -> tuple[list[MicroBatch], int]:
        """(this rank's micro-batches of step ``step``, tokens in the global batch)."""
        batch, tokens = self.batches.batch(step)
        out = []
        for lo, hi in _split_rows(batch["input_ids"].shape[0], self.accumulation):
            part = {k: v[lo:hi].to(self.device) for k, v in batch.items()}
            weight = float((part["labels"][:, 1:] != -100).sum())
            out.append(MicroBatch(loss=lambda part=part: causal_lm_loss(placement, part), weight=weight))
        return out, tokens

    def closure(self, placement: Placement, step: int) -> tuple[Closure, int]:
        """(closure for MeZO, tokens in the global batch)."""
        micro, tokens = self.micro_batches(placement, step)
        return summed(micro), tokens


class TaskObjective:
    """A task's training loss (gold-answer tokens, or cross-entropy over candidates), or with
    ``non_diff`` the negated metric itself (accuracy or F1): the paper's non-differentiable case."""

    unit = "examples"

    def __init__(
        self,
        samples: list[Sample],
        tokenizer,
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        as_classification: bool,
        non_diff: str | None = None,
        max_length: int | None = None,
        max_new_tokens: int = 50,
        accumulation: int = 1,
        masked_lm: bool = False,
    ) -> None:
        self.samples, self.tokenizer, self.device = samples, tokenizer, device
        self.masked_lm = masked_lm  # the model is a masked LM: candidates scored at mask tokens
        self.accumulation = accumulation
        # A rank's share of a step is micro_batch x accumulation samples, cut into micro-batches.
        self.order = GlobalOrder(len(samples), micro_batch=micro_batch * accumulation, rank=rank,
                                 world_size=world_size, seed=seed)
        self.as_classification, self.non_diff = as_classification, non_diff
        self.max_length, self.max_new_tokens = max_length, max_new_tokens

    def micro_batches(self, placement: Placement, step: int) -> tuple[list[MicroBatch], int]:
        """(this rank's micro-batches of step ``step``, examples in the global batch)."""
        from mezo_dist.encoding import encoded_shape, target_token_count

        mine = [self.samples[i] for i in self.order.local_indices(step)]
        chunks = [mine[lo:hi] for lo, hi in _split_rows(len(mine), self.accumulation)]
        units = len(mine) * self.order.world_size
        if self.non_diff:
            return [MicroBatch(loss=lambda c=c: self._negated_metric(placement, c), weight=float(len(c)))
                    for c in chunks], units
        # Every micro-batch is padded to the global batch's shape (longest sequence, most logit
        # positions read): the forward one process would run.
        shape = encoded_shape(self.tokenizer, [self.samples[i] for i in self.order.global_indices(step)],
                              as_classification=self.as_classification, max_length=self.max_length,
                              masked_lm=self.masked_lm)
        out = []
        for c in chunks:
            weight = float(len(c)) if self.as_classification else float(
                target_token_count(self.tokenizer, c, max_length=self.max_length, masked_lm=self.masked_lm))
            out.append(MicroBatch(loss=lambda c=c: self._loss(placement, c, shape), weight=weight))
        return out, units

    def closure(self, placement: Placement, step: int) -> tuple[Closure, int]:
        """(closure for MeZO, examples in the global batch)."""
        micro, units = self.micro_batches(placement, step)
        return summed(micro), units

    def _loss(self, placement: Placement, mine: list[Sample], shape):
        from mezo_dist.scoring import candidate_loss

        # One forward call per rank (batch_size=None): sharded engines need equal call counts.
        total, count = candidate_loss(placement.forward, self.tokenizer, mine, device=self.device,
                                      as_classification=self.as_classification, max_length=self.max_length,
                                      pad_to=shape, masked_lm=self.masked_lm)
        return total.double(), count.double()

    def _negated_metric(self, placement: Placement, mine: list[Sample]):
        from mezo_dist.metrics_text import f1
        from mezo_dist.generation import greedy_generate, supports_kv_cache
        from mezo_dist.scoring import predict

        if self.non_diff == "f1":
            from mezo_dist.evaluate import BalancedForward, dummy_token

            # Generation stops at different lengths on different ranks, and every forward of a
            # sharded model is collective: the ranks agree before each forward, pad with dummies.
            forward = BalancedForward(placement, token_id=dummy_token(self.tokenizer), num_samples=len(mine))
            preds = greedy_generate(forward, self.tokenizer, [s.context for s in mine], device=self.device,
                                    max_new_tokens=self.max_new_tokens, max_length=self.max_length,
                                    batch_size=None, use_cache=supports_kv_cache(placement.module),
                                    masked_lm=self.masked_lm)
            forward.finish()
            score = sum(f1(p, s.answers) for p, s in zip(preds, mine))
        else:
            # All candidates in one forward: every rank makes exactly one call, no balancing needed.
            preds = predict(placement.forward, self.tokenizer, mine, device=self.device, batch_size=None,
                            max_length=self.max_length, masked_lm=self.masked_lm)
            score = sum(float(s.is_correct(p)) for p, s in zip(preds, mine))
        return torch.tensor(-score, dtype=torch.float64), torch.tensor(float(len(mine)), dtype=torch.float64)
