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

With ``--precision`` bf16/fp16 over fp32 values DeepSpeed holds the model in the compute dtype,
and MeZO edits fp32 masters (``masters.py``) of what this rank edits: its partition of every
parameter (4 bytes per parameter / world size), or the whole parameter while DeepSpeed keeps it
gathered on every rank. :meth:`Zero3Placement.reform_master` moves a master between the two
forms; checkpoints and exports carry the fp32 masters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mezo_dist.distributed import DistState
from mezo_dist.placement.base import Piece, Placement, decays
from mezo_dist.placement.masters import Masters


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

    def __init__(self, engine: Any, state: DistState, *, with_optimizer: bool = False,
                 masters: Masters | None = None) -> None:
        """Args:
            engine: a ZeRO stage 3 ``DeepSpeedEngine``.
            with_optimizer: the engine trains by backpropagation (the baseline).
            masters: for a bf16/fp16 engine under MeZO, fp32 masters of what this rank edits (see
                :meth:`reform_master`).
        """
        super().__init__(engine, state, masters=masters)
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
        # name -> parameter, as of the last storage_pieces(): what reform_master moves.
        self._params: dict[str, nn.Parameter] = {}

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

    def storage_pieces(self) -> list[Piece]:
        status = _status()
        out: list[Piece] = []
        self._mirrors = []
        self._params = {}
        self._settle()
        if not self._with_optimizer:
            self._gather_persistent()
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            shape = tuple(p.ds_shape)
            self._params[name] = p
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
    def reform_master(self, piece: Piece, held: torch.Tensor) -> torch.Tensor:
        """A master follows its parameter's form, exactly: gathered since the last pass, the fp32
        partitions are all-gathered into a whole master (collective); released again, the
        master is cut back to this rank's partition.

        The masters start from the model as DeepSpeed built it, i.e. from the checkpoint rounded
        to the compute dtype (``zero.Init`` builds the partitions in it), unlike ``single`` and
        ``fsdp``, whose fp32 values are the checkpoint's own."""
        p = self._params[piece.name]
        if piece.shard:
            offset, valid = _partition_geometry(p)
            return held[offset : offset + valid].clone()
        return _whole(held, p)

    @torch.no_grad()
    def after_edit(self, *, compute_written: bool = False) -> None:
        super().after_edit(compute_written=compute_written)  # masters into the model's storage first
        for p, offset, valid in self._mirrors:
            p.ds_tensor.data.view(-1)[:valid].copy_(p.data.view(-1)[offset : offset + valid])

    def _whole_master(self, name: str) -> torch.Tensor:
        """The whole fp32 master of parameter ``name`` in its shape, on every rank (collective
        for a partitioned one)."""
        p = self._params[name]
        master, shard = self.masters.held(name)
        return (_whole(master, p) if shard else master).view(tuple(p.ds_shape))

    def eval(self) -> None:
        self.model.eval()

    def training(self, args, *, lr: float, weight_decay: float):
        # DeepSpeed built the optimizer from the ds_config (filled from the same flags).
        from mezo_dist.placement.training import DeepSpeedTraining

        return DeepSpeedTraining(self)

    @torch.no_grad()
    def gather_tensor(self, slot: tuple[nn.Module, str]) -> torch.Tensor:
        import deepspeed

        if self.masters is not None:
            module, attr = slot
            p = module._parameters.get(attr)
            if p is not None and p.requires_grad:
                self.pieces()  # masters for every trainable parameter, in their current form
                name = next((n for n, q in self._params.items() if q is p), None)
                if name is not None and self.masters.held(name) is not None:
                    return self._whole_master(name)
        self._settle()
        t = super().gather_tensor(slot)
        if not hasattr(t, "ds_id"):
            return t
        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.data.clone()

    def gathered_dtype(self, slot: tuple[nn.Module, str]) -> torch.dtype:
        # With masters, what MeZO edits (and gather_tensor returns) of a trainable parameter is
        # its fp32 master, not the engine's bf16/fp16 storage.
        p = slot[0]._parameters.get(slot[1])
        if self.masters is not None and p is not None and p.requires_grad:
            return torch.float32
        return super().gathered_dtype(slot)

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
        if self.state.is_main:
            param_names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
            for key, value in module.state_dict().items():
                if key not in param_names:  # persistent buffers are never partitioned
                    sd[key] = value.detach().to("cpu", copy=True)
        if self.masters is not None:  # the fp32 masters in place of the compute-dtype values
            self.pieces()  # masters for every trainable parameter, in their current form
            for name in self.masters.names():
                whole = self._whole_master(name)
                if self.state.is_main and name in sd:
                    sd[name] = whole.to("cpu", copy=True)
        return sd if self.state.is_main else None


def _whole(part: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
    """The whole flat parameter from every rank's ``part`` of it (``valid`` elements each, as
    :func:`_partition_geometry` gives them): padded to the partition size, all-gathered in
    ``p``'s group, cut to the parameter's length. Collective."""
    if not dist.is_initialized():
        return part.clone()
    group = getattr(p, "ds_process_group", None)
    padded = torch.zeros(p.ds_tensor.ds_numel, dtype=part.dtype, device=part.device)
    padded[: part.numel()].copy_(part)
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[: p.ds_numel]


def _swapped_out(p: nn.Parameter) -> bool:
    # ZeRO-Infinity's NVMe offload keeps a partition on disk between uses (ds_tensor is empty).
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    return getattr(p.ds_tensor, "status", None) == PartitionedParamStatus.NOT_AVAILABLE


def _is_offload_only(optimizer: Any) -> bool:
    # Without a client optimizer DeepSpeed still keeps a parameter-offload manager here.
    return type(optimizer).__name__ == "DeepSpeedZeRoOffload"


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
    masters: Masters | None = None,
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
    from mezo_dist.placement.deepspeed_config import fill_ds_config

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
    placement = Zero3Placement(engine, state, with_optimizer=optimizer is not None, masters=masters)
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
