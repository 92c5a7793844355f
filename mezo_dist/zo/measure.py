"""The one collective of a zeroth-order step: the all-reduce of a few loss sums and a weight.

Shared by the optimizers of ``fzoo.py`` and ``adaptive.py`` (``step.py`` does the same inline for
MeZO, whose code stays as it was).
"""

from __future__ import annotations

import torch

from mezo_dist.placement.base import Placement


def reduce_losses(placement: Placement, measured: list[torch.Tensor], weight: torch.Tensor) -> list[float]:
    """Global mean losses ``sum_r measured[i] / sum_r weight`` over the ranks, in one all-reduce
    of ``len(measured) + 1`` float64 numbers (NCCL reduces CUDA tensors, gloo CPU ones)."""
    stats = torch.stack([*measured, weight]).to(placement.state.device)
    stats = placement.all_reduce_sum(stats).cpu()
    return [float(v / stats[-1]) for v in stats[:-1]]
