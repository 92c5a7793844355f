"""What a MeZO step minimises: the causal-LM loss of text, or a task's loss or metric.

An objective turns a step number into this rank's share of the global batch and that share into
a closure for :meth:`MeZO.step`. The global order depends on the run seed and the global batch
only, so every world size sees the same examples at the same step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from mezo_dist import faults
from mezo_dist.data import GlobalOrder, TextBatches
from mezo_dist.placement.base import Placement
from mezo_dist.tasks.base import Sample

Closure = Callable[[], Any]


def causal_lm_loss(placement: Placement, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token losses, number of target tokens) on this rank's micro-batch."""
    logits = placement.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    )
    # Summed in float64: per-token losses agree bit for bit across layouts, and a float64 sum
    # keeps the order of summation (1 process vs N ranks) from showing up in L+ - L-.
    return per_token.double().sum(), (targets != -100).sum()


def _poisoned(closure: Closure) -> Closure:
    """Test-only: the second call (the minus side) returns NaN."""
    calls = {"n": 0}

    def wrapped():
        total, weight = closure()
        calls["n"] += 1
        return (total * float("nan"), weight) if calls["n"] == 2 else (total, weight)

    return wrapped


class TextObjective:
    """Next-token loss over a JSON Lines file of texts."""

    unit = "tokens"

    def __init__(self, batches: TextBatches, device: torch.device) -> None:
        self.batches, self.device = batches, device

    def closure(self, placement: Placement, step: int) -> tuple[Closure, int]:
        """(closure, tokens in the global batch)."""
        batch, tokens = self.batches.batch(step)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        fn = lambda: causal_lm_loss(placement, batch)  # noqa: E731
        return (_poisoned(fn) if step in faults.nan_steps() else fn), tokens


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
    ) -> None:
        self.samples, self.tokenizer, self.device = samples, tokenizer, device
        self.order = GlobalOrder(len(samples), micro_batch=micro_batch, rank=rank, world_size=world_size, seed=seed)
        self.as_classification, self.non_diff = as_classification, non_diff
        self.max_length, self.max_new_tokens = max_length, max_new_tokens

    def closure(self, placement: Placement, step: int) -> tuple[Closure, int]:
        from mezo_dist.scoring import encoded_width

        mine = [self.samples[i] for i in self.order.local_indices(step)]
        if self.non_diff:
            fn = lambda: self._negated_metric(placement, mine)  # noqa: E731
        else:
            # Every rank pads to the global batch's longest sequence: one process would.
            width = encoded_width(self.tokenizer, [self.samples[i] for i in self.order.global_indices(step)],
                                  as_classification=self.as_classification, max_length=self.max_length)
            fn = lambda: self._loss(placement, mine, width)  # noqa: E731
        return (_poisoned(fn) if step in faults.nan_steps() else fn), len(mine) * self.order.world_size

    def _loss(self, placement: Placement, mine: list[Sample], width: int):
        from mezo_dist.scoring import candidate_loss

        # One forward call per rank (batch_size=None): sharded engines need equal call counts.
        total, count = candidate_loss(placement.forward, self.tokenizer, mine, device=self.device,
                                      as_classification=self.as_classification, max_length=self.max_length,
                                      pad_to=width)
        return total.double(), count.double()

    def _negated_metric(self, placement: Placement, mine: list[Sample]):
        from mezo_dist.metrics_text import f1
        from mezo_dist.scoring import greedy_generate, predict

        if self.non_diff == "f1":
            from mezo_dist.evaluate import BalancedForward, _dummy_token

            # Generation stops at different lengths on different ranks, and every forward of a
            # sharded model is collective: the ranks agree before each forward, pad with dummies.
            forward = BalancedForward(placement, token_id=_dummy_token(self.tokenizer), num_samples=len(mine))
            preds = greedy_generate(forward, self.tokenizer, [s.context for s in mine], device=self.device,
                                    max_new_tokens=self.max_new_tokens, max_length=self.max_length)
            forward.finish()
            score = sum(f1(p, s.answers) for p, s in zip(preds, mine))
        else:
            # All candidates in one forward: every rank makes exactly one call, no balancing needed.
            pairs = sum(len(s.candidates) for s in mine)
            preds = predict(placement.forward, self.tokenizer, mine, device=self.device, batch_size=max(1, pairs),
                            max_length=self.max_length)
            score = sum(float(s.is_correct(p)) for p, s in zip(preds, mine))
        return torch.tensor(-score, dtype=torch.float64), torch.tensor(float(len(mine)), dtype=torch.float64)
