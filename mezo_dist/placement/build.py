"""The placement of the launch path: the run's model on this rank, as ``--backend`` places it.

Each backend's builder takes what it needs from the same arguments; what differs between them
(where the forward dtype is applied, how a trainable engine is made) stays here and in the
backends' own modules, not in the training loop.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mezo_dist.distributed import DistState
from mezo_dist.placement.base import Placement


def group_needs(backend: str) -> dict[str, bool]:
    """What ``backend`` needs of the process group before it builds (``init_distributed``'s
    keywords): DeepSpeed's communication layer for zero3 (even on one process), a group for the
    device mesh of fsdp (even on one process)."""
    return {"use_deepspeed": backend == "zero3", "need_group": backend == "fsdp"}


def build_placement(
    m: Any, state: DistState, *, peft: Any = None, backend: str, ds_config: str | None, micro_batch: int,
    accumulation: int = 1, backprop: Any = None, learning_rate: float = 0.0,
    weight_decay: float = 0.0, compute_dtype: torch.dtype | None = None,
) -> Placement:
    """The model on this rank, as ``backend`` places it (``m``: ``config.ModelArguments``; ``peft``:
    ``config.PeftArguments``, LoRA adapters or a prefix to train, None for every parameter).

    ``compute_dtype`` (``--precision`` bf16/fp16 over fp32 values): forwards in that dtype, fp32
    values for MeZO to edit (autocast on single, FSDP2 mixed precision, fp32 masters on zero3).

    ``backprop`` (the baseline's ``config.BackpropArguments``) asks for a trainable model:
    gradient checkpointing if set, and for zero3 a DeepSpeed engine with the ds_config's optimizer.
    """
    from mezo_dist.models import DTYPES

    build = BUILDERS[backend]
    return build(m, state, peft=peft, dtype=DTYPES[m.torch_dtype], ds_config=ds_config, micro_batch=micro_batch,
                 accumulation=accumulation, backprop=backprop, learning_rate=learning_rate,
                 weight_decay=weight_decay, compute_dtype=compute_dtype)


def _checkpointing(backprop: Any) -> bool:
    return backprop is not None and backprop.gradient_checkpointing


def _torch_placed(build: Callable[..., Placement], m: Any, state: DistState, *, peft: Any, dtype: torch.dtype,
                  backprop: Any, compute_dtype: torch.dtype | None, **_: Any) -> Placement:
    """single and fsdp: the builder applies the forward dtype; checkpointing is set on the module."""
    placement = build(m.model_name_or_path, state, dtype=dtype, trust_remote_code=m.trust_remote_code, lora=peft,
                      compute_dtype=compute_dtype)
    if _checkpointing(backprop):
        placement.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return placement


def _single(m: Any, state: DistState, **kw: Any) -> Placement:
    from mezo_dist.placement.single import build_single

    return _torch_placed(build_single, m, state, **kw)


def _fsdp(m: Any, state: DistState, **kw: Any) -> Placement:
    from mezo_dist.placement.fsdp import build_fsdp

    return _torch_placed(build_fsdp, m, state, **kw)


def _zero3(m: Any, state: DistState, *, peft: Any, dtype: torch.dtype, ds_config: str | None, micro_batch: int,
           accumulation: int, backprop: Any, learning_rate: float, weight_decay: float,
           compute_dtype: torch.dtype | None) -> Placement:
    from mezo_dist.placement.deepspeed_config import read_ds_config
    from mezo_dist.placement.masters import Masters
    from mezo_dist.placement.zero3 import build_zero3

    optimizer = None
    if backprop is not None:
        optimizer = {"lr": learning_rate, "betas": [backprop.adam_beta1, backprop.adam_beta2],
                     "eps": backprop.adam_epsilon, "weight_decay": weight_decay, "momentum": backprop.momentum,
                     "gradient_clipping": backprop.max_grad_norm}
    # A bf16/fp16 engine under MeZO edits fp32 masters; the baseline trains bf16/fp16 through
    # DeepSpeed's own mixed precision (fp32 master weights inside its optimizer).
    masters = Masters() if compute_dtype is not None and backprop is None else None
    return build_zero3(
        m.model_name_or_path, read_ds_config(ds_config, with_optimizer=backprop is not None), state,
        micro_batch=micro_batch, dtype=compute_dtype or dtype, trust_remote_code=m.trust_remote_code, lora=peft,
        accumulation=accumulation, optimizer=optimizer, gradient_checkpointing=_checkpointing(backprop),
        masters=masters,
    )


BUILDERS: dict[str, Callable[..., Placement]] = {"single": _single, "fsdp": _fsdp, "zero3": _zero3}
