"""DeepSpeed ZeRO-3 as a forward-only engine (no optimizer: nothing overwrites our edits).

Each parameter's flat partition ``param.ds_tensor`` holds ``ceil(numel / world)`` elements; rank
r holds the flat range ``[r * chunk, (r + 1) * chunk)`` and the tail of the last rank is padding.
Parameters below ``stage3_param_persistence_threshold`` (and any parameter the engine has left
gathered) are live in ``param.data`` on every rank: those are edited whole, identically on every
rank, and the rank's slice is copied back into ``ds_tensor`` so that DeepSpeed's own partition
never goes stale (it is what the next gather, or a checkpoint, reads).

With parameter offload (``offload_param`` device cpu) the partitions of non-persistent
parameters live in host memory: the pieces are those host tensors, edited in place where they
are, and their noise is drawn on the host (so an offloaded GPU run matches runs drawn on CPU, not
a non-offloaded GPU run). NVMe offload swaps partitions out to disk between uses, where in-place
edits cannot reach them: it is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mezo_dist.distributed import DistState
from mezo_dist.placement.base import Piece, Placement, decays


def _status():
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return ZeroParamStatus


def _partition_geometry(p: nn.Parameter) -> tuple[int, int]:
    """(offset of this rank's partition in the flat parameter, number of valid elements)."""
    group = getattr(p, "ds_process_group", None)
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    chunk = p.ds_tensor.ds_numel
    offset = rank * chunk
    return offset, max(0, min(chunk, p.ds_numel - offset))


class Zero3Placement(Placement):
    """Wraps a ``deepspeed.DeepSpeedEngine`` built with ZeRO stage 3 and no optimizer."""

    name = "zero3"

    def __init__(self, engine: Any, state: DistState, *, with_optimizer: bool = False) -> None:
        super().__init__(engine, state)
        if engine.zero_optimization_stage() != 3:
            raise ValueError(f"the zero3 placement needs a ZeRO stage 3 engine, got stage {engine.zero_optimization_stage()}")
        # ``with_optimizer``: the backprop baseline, which trains through engine.step() and only
        # edits partitions in place to load a checkpoint when no step follows.
        if not with_optimizer and engine.optimizer is not None and not _is_offload_only(engine.optimizer):
            # An engine with an optimizer copies its fp32 master partition over the model
            # partition at engine.step(), undoing every MeZO update.
            raise ValueError("the zero3 placement needs a DeepSpeed engine without an optimizer")
        self._mirrors: list[tuple[nn.Parameter, int, int]] = []
        self._with_optimizer = with_optimizer

    def _gather_persistent(self) -> None:
        """Fetch the parameters DeepSpeed keeps gathered after their first use (below
        ``stage3_param_persistence_threshold``) before handing out pieces: else such a piece is
        a partition before the first forward (or after a gathered export released it) and the
        whole parameter after it, and per-piece state of an optimizer (Sparse MeZO's mask) would
        see its geometry change between two passes of a step. A collective only when one of them
        is partitioned, which every rank sees alike."""
        status = _status()
        persist = [p for p in self.module.parameters() if getattr(p, "ds_persist", False)
                   and p.ds_status == status.NOT_AVAILABLE]
        if persist:
            persist[0].all_gather(param_list=persist)

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def _settle(self) -> None:
        """A training engine prefetches for a backward that an evaluation forward never runs;
        wait for those gathers and release them (DeepSpeed's own call) before touching
        partitions."""
        status = _status()
        if any(p.ds_status == status.INFLIGHT for p in self.module.parameters()):
            self.model.empty_partition_cache()

    def pieces(self) -> list[Piece]:
        status = _status()
        out: list[Piece] = []
        self._mirrors = []
        self._settle()
        if not self._with_optimizer:
            self._gather_persistent()
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            shape = tuple(p.ds_shape)
            if p.ds_status == status.INFLIGHT:
                raise RuntimeError(f"parameter {name} is still being gathered; cannot edit it")
            if p.ds_status == status.AVAILABLE:
                full = p.data.view(-1)
                out.append(Piece(name, full, 0, p.ds_numel, decays(shape), shard=False))
                offset, valid = _partition_geometry(p)
                if valid > 0:
                    self._mirrors.append((p, offset, valid))
            else:
                if _swapped_out(p):
                    raise RuntimeError(
                        f"parameter {name}: its partition is swapped out to NVMe; MeZO edits partitions in place, "
                        "so the zero3 placement supports offload_param device cpu, not nvme"
                    )
                offset, valid = _partition_geometry(p)
                # With offload_param device cpu this is a host tensor; the noise is drawn there.
                local = p.ds_tensor.data.view(-1)[:valid]
                out.append(Piece(name, local, offset, p.ds_numel, decays(shape), shard=True))
        return out

    @torch.no_grad()
    def after_edit(self) -> None:
        for p, offset, valid in self._mirrors:
            p.ds_tensor.data.view(-1)[:valid].copy_(p.data.view(-1)[offset : offset + valid])

    def eval(self) -> None:
        self.model.eval()

    def training(self, args, *, lr: float, weight_decay: float):
        # DeepSpeed built the optimizer from the ds_config (filled from the same flags).
        from mezo_dist.placement.training import DeepSpeedTraining

        return DeepSpeedTraining(self)

    @torch.no_grad()
    def gather_tensor(self, slot: tuple[nn.Module, str]) -> torch.Tensor:
        import deepspeed

        self._settle()
        t = super().gather_tensor(slot)
        if not hasattr(t, "ds_id"):
            return t
        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.data.clone()

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        import deepspeed

        self._settle()
        module = self.module
        sd: dict[str, torch.Tensor] = {}
        # A tied parameter appears once, under its first name, as in the other placements.
        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.state.is_main:
                    sd[name] = p.data.detach().to("cpu", copy=True)
        if not self.state.is_main:
            return None
        param_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
        for key, value in module.state_dict().items():
            if key not in param_names:  # persistent buffers are never partitioned
                sd[key] = value.detach().to("cpu", copy=True)
        return sd


def _swapped_out(p: nn.Parameter) -> bool:
    # ZeRO-Infinity's NVMe offload keeps a partition on disk between uses (ds_tensor is empty).
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    return getattr(p.ds_tensor, "status", None) == PartitionedParamStatus.NOT_AVAILABLE


def _is_offload_only(optimizer: Any) -> bool:
    # Without a client optimizer DeepSpeed still keeps a parameter-offload manager here.
    return type(optimizer).__name__ == "DeepSpeedZeRoOffload"


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
        from mezo_dist.config import FILLED_OPTIMIZER_PARAMS

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


def build_zero3(
    name_or_path: str,
    ds_config: dict,
    state: DistState,
    *,
    micro_batch: int,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    lora=None,
    accumulation: int = 1,
    optimizer: dict[str, Any] | None = None,
    gradient_checkpointing: bool = False,
) -> Zero3Placement:
    """Build partitioned under ``deepspeed.zero.Init``, have every rank read only its partition of
    each tensor from the pretrained safetensors (:mod:`mezo_dist.hf_shards`; transformers' own
    ZeRO-3 loading opens every file whole on rank 0), and wrap in a forward-only engine.

    LoRA adapters (``lora.lora``) are made after loading, outside ``zero.Init``, from the same
    seed on every rank; ``deepspeed.initialize`` then partitions them like every other parameter.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from mezo_dist import hf_shards
    from mezo_dist.models import apply_lora, load_config

    hidden = getattr(load_config(name_or_path, trust_remote_code=trust_remote_code), "hidden_size", None)
    cfg = fill_ds_config(ds_config, micro_batch=micro_batch, world_size=state.world_size, dtype=dtype, hidden_size=hidden,
                         accumulation=accumulation, optimizer=optimizer)
    # transformers reads this global to build the model partitioned; it must outlive loading.
    hf_ds = HfDeepSpeedConfig(cfg)
    folder = hf_shards.resolve_folder(name_or_path)
    files = hf_shards.SafetensorsFolder(folder)
    config = load_config(str(folder), trust_remote_code=trust_remote_code)
    model = _partitioned_from_config(config, cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    model.eval()  # as from_pretrained returns it: no dropout in a forward before training
    sources = hf_shards.slots_of(model, hf_shards.checkpoint_keys(model, files))
    hf_shards.load_into(model, sources, files, _held_partition)
    del files
    model = apply_lora(model, lora)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if optimizer is None:
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
    else:
        from mezo_dist.placement.training import param_groups

        groups = param_groups(model, float(cfg["optimizer"]["params"].get("weight_decay", 0.0)))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    if getattr(lora, "prefix_tuning", False) and lora.prefix_init == "real":
        _init_prefix(engine.module, lora.prefix_init_seed)
    placement = Zero3Placement(engine, state, with_optimizer=optimizer is not None)
    placement._hf_ds_config = hf_ds
    placement.checkpoint_sources = sources
    return placement


def _partitioned_from_config(config: Any, ds_config: dict, *, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model of ``config``, partitioned by ``zero.Init`` as each module is made, its weights
    left unset (they are read next).

    The contexts are the ones transformers enters itself for a ZeRO-3 ``from_config``, entered
    here so that it does not: inside its own, once the model is built, it gathers every module
    in turn and initialises its weights at random on rank 0 (``initialize_weights_zero3``), i.e.
    the whole model passes through every rank once, a module at a time, only to be overwritten.
    """
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    from mezo_dist.models import auto_class

    # The order is transformers' own (PreTrainedModel.get_init_context): the arange fix before
    # zero.Init, and set_zero3_state last, which tells from_config that zero.Init is entered.
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config), \
            set_zero3_state():
        return auto_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def _held_partition(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """This rank's partition of a parameter made under ``zero.Init`` (flat view, offset); a
    buffer is held whole."""
    if not hasattr(t, "ds_id"):
        return t.data.view(-1), 0
    offset, valid = _partition_geometry(t)
    return t.ds_tensor.data.view(-1)[:valid], offset


@torch.no_grad()
def _init_prefix(model: nn.Module, seed: int) -> None:
    """Set the prefix from real activations once partitioned: the forward runs through the
    engine's hooks on every rank (layers gathered one at a time, never the whole model)."""
    import deepspeed

    from mezo_dist.models import prefix_activations, prefix_embedding

    values = prefix_activations(model, seed)
    weight = prefix_embedding(model)
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
        if values.shape != weight.shape:
            raise ValueError(f"prefix activations of shape {tuple(values.shape)} do not fit peft's prefix {tuple(weight.shape)}")
        weight.copy_(values.to(weight.dtype))
