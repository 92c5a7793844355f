"""The one interface between the MeZO step and wherever the model lives.

A MeZO step needs three things from a placement:
  1. the trainable parameters as this rank holds them (:class:`Piece`): a flat, in-place editable
     view of the local elements and their offset inside the full flattened parameter;
  2. a callable model to run forward on this rank's micro-batch;
  3. a sum all-reduce of a small tensor across the ranks that see different data.
Everything engine-specific (DTensor shards, ZeRO-3 partitions and persistent parameters, plain
replicas) stays behind it, so the step cannot tell one placement from another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mezo_dist.distributed import DistState

if TYPE_CHECKING:
    from mezo_dist.placement.masters import Masters


@dataclass(frozen=True)
class Piece:
    """The elements of one trainable parameter that this rank edits.

    Attributes:
        name: the parameter's name in the unwrapped model (the same under every placement).
        local: a 1-D view of the local elements; editing it in place edits the model.
        offset: index of ``local[0]`` in the flattened full parameter.
        full_numel: number of elements of the full parameter.
        decay: whether weight decay applies (matrices yes; biases and norm weights no).
        shard: True for a piece of a sharded parameter, False for a full replica.
        compute: with ``--precision`` over fp32 values, the storage the forward reads (same
            elements as ``local``, which is then an fp32 master): a pass leaves it holding
            ``local + (current perturbation) z``, so ``local`` itself is never perturbed and a
            +eps, -2 eps, +eps cycle gives it back bit for bit.
    """

    name: str
    local: torch.Tensor
    offset: int
    full_numel: int
    decay: bool
    shard: bool
    compute: torch.Tensor | None = None


def decays(full_shape: torch.Size | tuple[int, ...]) -> bool:
    # Biases and norm weights are the 1-D parameters; the reference exempts them from decay.
    return len(full_shape) >= 2


class Placement(ABC):
    """A model placed on this rank. Subclasses: single, fsdp, zero3."""

    name: str = "base"
    # Every rank holds the whole model (data-parallel replicas): what ``--check_replicas_steps``
    # compares across ranks.
    replicated: bool = False

    def __init__(self, model: nn.Module, state: DistState, *, masters: Masters | None = None) -> None:
        """Args:
            model: the model as the engine placed it.
            state: this rank's distributed state.
            masters: with ``--precision`` over fp32 values, the fp32 masters MeZO edits in place
                of the model's storage (``placement/masters.py``); None edits the storage itself.
        """
        self.model = model
        self.state = state
        self.masters = masters
        # What :meth:`forward` calls: the model itself, unless the backprop baseline wraps it
        # for gradient averaging (DDP). MeZO never needs a wrapper.
        self.runner: nn.Module = model
        # Scoring asks every forward for the logits it reads only (``logits_to_keep``); models
        # without that argument get it through hooks inside their own forward.
        from mezo_dist.logits import support_logits_to_keep

        support_logits_to_keep(self.module)

    def pieces(self) -> list[Piece]:
        """The trainable elements this rank edits, ready for in-place edits right now: the
        engine's storage (:meth:`storage_pieces`), or with masters the fp32 masters, whose
        ``compute`` is that storage.

        Called before every pass over the parameters: an engine may have gathered or released
        parameters during the forward in between.
        """
        held = self.storage_pieces()
        if self.masters is None:
            return held
        return self.masters.attach(held, reform=self.reform_master)

    @abstractmethod
    def storage_pieces(self) -> list[Piece]:
        """The engine's own storage of the trainable elements this rank holds, as it is now."""

    def reform_master(self, piece: Piece, held: torch.Tensor) -> torch.Tensor:
        """The master of ``piece`` after its form changed since the last pass (``held``: the
        master in the old form). Engines whose pieces never change form start it afresh from
        the model's values."""
        from mezo_dist.placement.masters import fresh_master

        return fresh_master(piece, held)

    def after_edit(self, *, compute_written: bool = False) -> None:
        """Called after each pass over :meth:`pieces`; engines with mirrored copies resync here.

        Args:
            compute_written: the pass already wrote the ``compute`` storage of the masters'
                pieces (the fused kernels do); otherwise it is set from the masters here.
        """
        if self.masters is not None and not compute_written:
            self.masters.sync()

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (a ``PreTrainedModel`` for the launch path)."""
        return self.model

    # Set by engines that start up from per-rank slices of the pretrained files: where each
    # tensor was read from ((id of module, attribute) -> checkpoint key, see
    # mezo_dist.hf_shards.slots_of). The final export then writes per rank under those keys;
    # None: the placement holds the whole model and exports it as it is.
    checkpoint_sources: dict[tuple[int, str], str] | None = None

    def forward(self, **batch: Any) -> Any:
        return self.runner(**batch)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that hold different data. One collective."""
        return self.state.all_reduce_sum(t)

    def eval(self) -> None:
        # Forward passes of MeZO must be deterministic: dropout off.
        self.model.eval()

    def train(self) -> None:
        # The backprop baseline trains as fine-tuning usually does: dropout on.
        self.model.train()

    def training(self, args: Any, *, lr: float, weight_decay: float) -> Any:
        """How this engine trains by backpropagation (``args``: ``config.BackpropArguments``):
        a :class:`mezo_dist.placement.training.Training`; here a torch optimizer over the
        parameters, which suits one process and engines that average gradients themselves."""
        from mezo_dist.placement.training import TorchTraining

        return TorchTraining(self, args, lr=lr, weight_decay=weight_decay)

    def gather_tensor(self, slot: tuple[nn.Module, str]) -> torch.Tensor:
        """The whole value of one parameter or buffer (``(module, attribute)``), on every rank:
        the values MeZO edits (fp32 masters where the engine computes in bf16/fp16). Collective
        on sharded engines; every rank asks for the same slots in the same order."""
        module, attr = slot
        t = module._parameters.get(attr)
        return t if t is not None else module._buffers[attr]

    def gathered_dtype(self, slot: tuple[nn.Module, str]) -> torch.dtype:
        """The dtype :meth:`gather_tensor` returns for ``slot``, known without gathering (an
        export lays out its files before it gathers anything)."""
        module, attr = slot
        t = module._parameters.get(attr)
        return (t if t is not None else module._buffers[attr]).dtype

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gather the whole model: a CPU state dict on rank 0, ``None`` elsewhere. Collective."""
