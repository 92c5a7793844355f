"""A ds_config judged by DeepSpeed's own config classes before any process group starts.

DeepSpeed validates its config (pydantic models such as ``DeepSpeedZeroConfig``, with unknown
keys forbidden) only inside ``deepspeed.initialize``, after the model is loaded and partitioned,
and reports it as a traceback on every rank. Building ``deepspeed.runtime.config.DeepSpeedConfig``
from the config as the run would fill it finds the same problems up front, in one line. DeepSpeed
is imported only here, and only for the zero3 backend.
"""

from __future__ import annotations

from typing import Any

import torch

from mezo_dist.errors import ConfigError

# pydantic model -> the ds_config section it reads, for the message.
_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16", "DeepSpeedFP16Config": "fp16",
             "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
             "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer"}


def check_with_deepspeed(ds: dict[str, Any], path: str, *, micro_batch: int, accumulation: int, world_size: int,
                         dtype: torch.dtype) -> None:
    """Refuse what ``deepspeed.initialize`` would refuse later.

    Args:
        ds: the config as read (``"auto"`` fields still in it).
        micro_batch, accumulation, world_size: the run's batch layout (the launcher's world size).
        dtype: the forward dtype, which fills ``bf16`` / ``fp16`` ``"enabled": "auto"``.
    """
    from pydantic import ValidationError

    from deepspeed.runtime.config import DeepSpeedConfig
    from mezo_dist.placement.zero3 import fill_ds_config

    explicit = ds.get("train_batch_size", "auto")
    if explicit != "auto" and explicit != micro_batch * world_size * accumulation:
        raise ConfigError(f"ds_config {path} sets train_batch_size={explicit!r}, but the run's global batch is "
                          f"{micro_batch} x {world_size} ranks x {accumulation} = {micro_batch * world_size * accumulation}")
    try:
        # DeepSpeed checks the batch against the world it sees: one rank before the launcher's
        # group starts (the global batch was checked above), the group's size where the caller
        # started one already.
        seen = _world_deepspeed_sees()
        filled = fill_ds_config(ds, micro_batch=micro_batch, world_size=seen, dtype=dtype, hidden_size=None,
                                accumulation=accumulation)
        filled["train_batch_size"] = micro_batch * seen * accumulation
        DeepSpeedConfig(filled)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join([_SECTIONS.get(e.title, e.title), *(str(x) for x in err["loc"])])
        raise ConfigError(f"ds_config {path}: {where}: {err['msg']} (got {err.get('input')!r})") from None
    except (ValueError, AssertionError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"ds_config {path} is refused by DeepSpeed: {first}") from None


def _world_deepspeed_sees() -> int:
    from deepspeed import comm

    try:
        return comm.get_world_size()
    except (RuntimeError, AssertionError, AttributeError):  # no group yet: DeepSpeed counts one
        return 1
