"""mezo_dist inside other libraries' training loops.

``transformers``: :class:`MeZOTrainer`, a ``transformers.Trainer`` whose step is a zeroth-order
step of this project, on the model Trainer prepared (a plain module, a forward-only DeepSpeed
ZeRO-3 engine, or an FSDP2 module). Imported lazily: ``import mezo_dist`` does not pull in
transformers' Trainer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MeZOTrainer", "MeZOTrainingArguments"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mezo_dist.integrations import transformers as hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
