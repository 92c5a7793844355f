"""PyTorch FSDP2: ``fully_shard`` on each transformer block, then on the root.

Every parameter becomes a DTensor sharded on dim 0; this rank edits the rows it holds (its
``to_local()`` piece), which are one contiguous range of the flattened parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mezo_dist.distributed import DistState
from mezo_dist.placement.base import Piece, Placement, decays
from mezo_dist.placement.masters import Masters


def block_classes(model: nn.Module) -> set[str]:
    """Class names of the repeated blocks, as Hugging Face declares them for splitting."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if names:
        return names
    # Some models (RoBERTa) declare none: take the class of the longest list of identical modules.
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    if not best:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot find its blocks to shard")
    return {type(best[0]).__name__}


def apply_fully_shard(
    model: nn.Module, mesh: DeviceMesh, *, reshard_after_forward: bool = True, mp: MixedPrecisionPolicy | None = None
) -> nn.Module:
    """Shard each block, then the root, in place (torchtitan's order)."""
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    blocks = block_classes(model)
    owners: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(name)
    for prefix, module in list(model.named_modules()):
        if type(module).__name__ not in blocks:
            continue
        # A block holding a tied parameter (RoBERTa's embeddings, tied to its LM head) stays with
        # the root: FSDP2 needs every name of a parameter inside one group.
        tied = any(not n.startswith(prefix + ".") for p in module.parameters() for n in owners[id(p)])
        if not tied:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def make_mesh(state: DistState) -> DeviceMesh:
    """1-D: shard over every rank. With ``hsdp_replicas`` R > 1, HSDP: a (R, world / R) mesh whose
    rows are shard groups (ranks of one node, consecutive) and whose columns replicate; FSDP2's
    all-gathers then stay inside a row. MeZO needs nothing across replicas but its scalar
    all-reduce: every replica draws the same z for the same shard and applies the same update."""
    replicas = state.hsdp_replicas
    if replicas > 1:
        return init_device_mesh(state.device.type, (replicas, state.world_size // replicas),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(state.device.type, (state.world_size,), mesh_dim_names=("shard",))


def _flat_offset(p: DTensor) -> int:
    for placement in p.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            # Rows of dim 0 are one contiguous range of the flat parameter; other splits are not.
            raise NotImplementedError(f"MeZO on FSDP2 needs dim-0 sharding, got {p.placements}")
    _, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = math.prod(p.shape[1:])
    return int(global_offset[0]) * row if p.dim() > 0 else 0


class FSDPPlacement(Placement):
    name = "fsdp"

    def _reshard(self) -> None:
        # The root keeps its parameters unsharded after forward in some modes; shards are only
        # authoritative once every FSDP module is resharded.
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def storage_pieces(self) -> list[Piece]:
        self._reshard()
        out = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if not isinstance(p, DTensor):
                raise TypeError(f"parameter {name} is not sharded by FSDP2")
            local = p.to_local()
            out.append(
                Piece(
                    name=name,
                    local=local.view(-1),
                    offset=_flat_offset(p),
                    full_numel=p.numel(),
                    decay=decays(p.shape),
                    shard=True,
                )
            )
        return out

    def gather_tensor(self, slot: tuple[nn.Module, str]) -> torch.Tensor:
        self._reshard()
        t = super().gather_tensor(slot)
        return t.full_tensor() if isinstance(t, DTensor) else t

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.state.is_main else None


def build_fsdp(
    name_or_path: str, state: DistState, *, dtype: torch.dtype, trust_remote_code: bool = False, lora=None,
    compute_dtype: torch.dtype | None = None,
) -> FSDPPlacement:
    """Build on meta, shard, materialise the shards, then have every rank read only its own rows
    of the pretrained safetensors (:mod:`mezo_dist.hf_shards`): no rank holds the whole model,
    on its device or its host, and no weight travels between ranks. LoRA adapters and a prefix
    (``lora``) start from the values peft draws from their seed, the same on every rank; a prefix
    set from real activations runs one sharded forward.

    ``compute_dtype`` (bf16/fp16 with fp32 ``dtype``): FSDP2 gathers the fp32 shards into
    bf16/fp16 parameters for each forward (``MixedPrecisionPolicy``); the shards MeZO edits stay
    fp32."""
    from mezo_dist import hf_shards
    from mezo_dist.models import apply_lora, empty_model, prefix_activations, prefix_embedding

    folder = hf_shards.resolve_folder(name_or_path)
    files = hf_shards.SafetensorsFolder(folder)
    base = empty_model(str(folder), dtype=dtype, trust_remote_code=trust_remote_code)
    sources = hf_shards.slots_of(base, hf_shards.checkpoint_keys(base, files))
    with hf_shards.captured_parameters() as adapters:
        model = apply_lora(base, lora)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    mp = None
    if compute_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    apply_fully_shard(model, make_mesh(state), mp=mp)
    model.to_empty(device=state.device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    hf_shards.load_into(model, sources, files, _held_rows, adapters=adapters)
    del files
    if getattr(lora, "prefix_tuning", False) and lora.prefix_init == "real":
        with torch.no_grad():  # one sharded forward on every rank; each keeps its rows
            values = prefix_activations(model, lora.prefix_init_seed)
            local, offset = _held_rows(prefix_embedding(model))
            local.copy_(values.reshape(-1)[offset : offset + local.numel()])
    # With compute_dtype the shards MeZO edits get fp32 masters apart from the shards the
    # forward gathers from.
    placement = FSDPPlacement(model, state, masters=Masters() if compute_dtype is not None else None)
    placement.checkpoint_sources = sources
    return placement


def _held_rows(t: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """This rank's rows of a sharded parameter (flat view, offset); a buffer is held whole."""
    if isinstance(t, DTensor):
        return t.to_local().view(-1), _flat_offset(t)
    return t.data.view(-1), 0
