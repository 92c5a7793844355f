"""Logits only where they are read: ``logits_to_keep`` for every model the project scores.

The vocabulary head is a large share of a small model's work per token (SmolLM2-135M: 576 x
49,152), and scoring reads its output at a few positions per row. Causal LMs of transformers take
``logits_to_keep`` (an int: the last n positions; a ``(batch, k)`` tensor: k positions per row)
and apply the head only there. For models whose forward lacks it (``RobertaForMaskedLM``),
:func:`support_logits_to_keep` adds the same argument with two hooks: one on the model takes the
argument out of the call, one on the output embedding selects the positions from the hidden
states it receives. Both run inside the model's own forward call, so a sharding engine (FSDP2,
ZeRO-3) gathers the head's parameters as it always does.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

Forward = Callable[..., Any]  # a model, a placement's forward, or a wrapper around one
_INSTALLED = "_mezo_logits_to_keep"


def _base_model(model: nn.Module) -> nn.Module:
    # A peft model passes unknown keyword arguments down to the model it wraps.
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s own forward accepts ``logits_to_keep``."""
    return "logits_to_keep" in inspect.signature(type(_base_model(model)).forward).parameters


def support_logits_to_keep(model: nn.Module) -> nn.Module:
    """Make ``model(..., logits_to_keep=...)`` work as transformers' causal LMs define it; a no-op
    for models that take the argument already, for models without an output embedding (a
    forward given ``logits_to_keep`` then fails), and on a second call. Returns ``model``.
    """
    base = _base_model(model)
    if getattr(base, _INSTALLED, False) or takes_logits_to_keep(base):
        return model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return model
    from transformers.modeling_utils import slice_logits_to_keep

    kept: dict[str, Any] = {"positions": None}

    def take(module, args, kwargs):
        kept["positions"] = kwargs.pop("logits_to_keep", None)
        return args, kwargs

    def drop(module, args, kwargs, output):
        kept["positions"] = None

    def select(module, args):
        positions = kept["positions"]
        if positions is None or (isinstance(positions, int) and positions == 0):
            return None
        return (slice_logits_to_keep(args[0], positions), *args[1:])

    base.register_forward_pre_hook(take, with_kwargs=True)
    base.register_forward_hook(drop, with_kwargs=True, always_call=True)
    head.register_forward_pre_hook(select)
    setattr(base, _INSTALLED, True)
    return model


def kept_logits(forward: Forward, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | int, **extra: Any) -> torch.Tensor:
    """Logits at ``positions`` only: ``(batch, k, vocab)`` for a ``(batch, k)`` tensor of positions,
    ``(batch, n, vocab)`` for an int n (the last n positions).

    Args:
        forward: the model, or a placement's forward; models without ``logits_to_keep`` need
            :func:`support_logits_to_keep` first (placements do it when built).
        extra: more keyword arguments of the forward (``use_cache`` defaults to False).
    """
    extra.setdefault("use_cache", False)
    out = forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions, **extra)
    logits = out.logits if hasattr(out, "logits") else out[0]
    want = tuple(positions.shape) if isinstance(positions, torch.Tensor) else (input_ids.shape[0], positions)
    if tuple(logits.shape[:2]) != want:
        raise ValueError(f"the model returned logits of shape {tuple(logits.shape)} for logits_to_keep of shape "
                         f"{want}; its forward does not select positions per row as transformers' causal LMs do")
    return logits
