"""DeepSpeed configs of the zero3 backend: read and checked (:func:`read_ds_config`), their
``"auto"`` fields filled from the run's flags (:func:`fill_ds_config`), and judged by DeepSpeed's
own config classes before any process group starts (:func:`check_with_deepspeed`).

DeepSpeed validates its config (pydantic models such as ``DeepSpeedZeroConfig``, with unknown
keys forbidden) only inside ``deepspeed.initialize``, after the model is loaded and partitioned,
and reports it as a traceback on every rank. Building ``deepspeed.runtime.config.DeepSpeedConfig``
from the config as the run would fill it finds the same problems up front, in one line. DeepSpeed
is imported only here, and only for the zero3 backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mezo_dist.errors import ConfigError

# The ds_config optimizer params whose "auto" is filled from the flags.
FILLED_OPTIMIZER_PARAMS = ("lr", "betas", "eps", "weight_decay", "momentum")
# The ds_config optimizer types each --optim takes.
OPTIMIZER_TYPES = {"adamw": "adamw", "adam": "adamw", "sgd": "sgd"}

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


def read_ds_config(path: str | None, *, with_optimizer: bool = False) -> dict[str, Any]:
    """Read and check a DeepSpeed ZeRO-3 config: forward-only for MeZO, with an optimizer section
    for the backprop baseline (``with_optimizer``)."""
    if path is None:
        raise ConfigError("the zero3 backend needs --ds_config (for example ds_configs/zero3.json)")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"ds_config {path} does not exist")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"ds_config {path} is not readable JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object")
    for section in ("zero_optimization", "optimizer", "bf16", "fp16"):
        if not isinstance(cfg.get(section, {}), dict):
            raise ConfigError(f"ds_config {path}: {section} must be an object, got {cfg[section]!r}")
    for section in ("offload_param", "offload_optimizer"):
        if not isinstance(cfg.get("zero_optimization", {}).get(section) or {}, dict):
            raise ConfigError(f"ds_config {path}: zero_optimization.{section} must be an object")
    if not isinstance(cfg.get("optimizer", {}).get("params", {}), dict):
        raise ConfigError(f"ds_config {path}: optimizer.params must be an object")
    stage = cfg.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"ds_config {path} has ZeRO stage {stage}; the zero3 backend needs stage 3")
    offload = cfg["zero_optimization"].get("offload_param") or {}
    if offload.get("device") == "nvme" and not with_optimizer:
        # NVMe offload swaps partitions out to disk between uses; MeZO's passes edit them in place.
        raise ConfigError(f"ds_config {path} offloads parameters to nvme; MeZO on the zero3 backend supports "
                          "offload_param device cpu (ds_configs/zero3_offload.json), not nvme")
    if "optimizer" in cfg and not with_optimizer:
        raise ConfigError(f"ds_config {path} defines an optimizer; MeZO's ZeRO-3 engine must be forward-only "
                          "(ds_configs/zero3.json), or pass --trainer regular")
    if with_optimizer and "optimizer" not in cfg:
        raise ConfigError(f"ds_config {path} has no optimizer section; --trainer regular needs one "
                          "(ds_configs/zero3_adamw.json)")
    return cfg


def check_optimizer(ds: dict[str, Any], path: str, *, optim: str) -> None:
    """The baseline's ds_config optimizer against ``--optim``, and every ``"auto"`` in its
    params one the flags fill."""
    kind = str(ds.get("optimizer", {}).get("type", "")).lower()
    if OPTIMIZER_TYPES.get(kind) != optim:
        raise ConfigError(f"ds_config {path} has optimizer {kind or 'without a type'}; --optim is {optim}")
    unfillable = [k for k, v in ds.get("optimizer", {}).get("params", {}).items()
                  if v == "auto" and k not in FILLED_OPTIMIZER_PARAMS]
    if unfillable:
        raise ConfigError(f"ds_config {path} optimizer params {', '.join(unfillable)} are 'auto', "
                          f"but only {', '.join(FILLED_OPTIMIZER_PARAMS)} are filled from the flags")


def fill_ds_config(
    ds_config: dict, *, micro_batch: int, world_size: int, dtype: torch.dtype, hidden_size: int | None,
    accumulation: int = 1, optimizer: dict[str, Any] | None = None,
) -> dict:
    """Replace ``"auto"`` fields from the run's own settings (accelerate's convention).

    ``optimizer`` holds the backprop baseline's settings (lr, betas, eps, weight_decay,
    gradient_clipping) for the ds_config's optimizer section.
    """
    import copy

    cfg = copy.deepcopy(ds_config)

    def fill(d: dict, key: str, value: Any) -> None:
        if d.get(key, "auto") == "auto":
            d[key] = value
        elif key in ("train_micro_batch_size_per_gpu",) and d[key] != value:
            raise ValueError(f"ds_config sets {key}={d[key]} but --per_device_train_batch_size is {value}")

    fill(cfg, "train_micro_batch_size_per_gpu", micro_batch)
    fill(cfg, "gradient_accumulation_steps", accumulation)
    fill(cfg, "train_batch_size", micro_batch * world_size * cfg["gradient_accumulation_steps"])
    cfg.setdefault("steps_per_print", 10**9)
    if optimizer is not None and "optimizer" in cfg:
        params = cfg["optimizer"].setdefault("params", {})
        for key in FILLED_OPTIMIZER_PARAMS:
            if key in optimizer and params.get(key) == "auto":
                params[key] = optimizer[key]
        fill(cfg, "gradient_clipping", optimizer.get("gradient_clipping", 0.0))
        left = [k for k, v in params.items() if v == "auto"]
        if left:
            raise ValueError(f"ds_config optimizer has 'auto' fields this run cannot fill: {', '.join(left)}")
    for key, want in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = cfg.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = want
    zero = cfg["zero_optimization"]
    if hidden_size is not None:
        # The same sizes the Hugging Face integration picks for "auto".
        fill(zero, "reduce_bucket_size", hidden_size * hidden_size)
        fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    else:
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
            if zero.get(key) == "auto":
                del zero[key]
    return cfg
