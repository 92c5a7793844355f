"""Hugging Face safetensors checkpoints read and written per rank: no process ever holds the model.

Start-up: every rank reads, from the pretrained files, only the elements of each tensor that it
holds (a flat range, one byte range of the file, read straight into its shard or partition by
:mod:`mezo_dist.safetensors_io`). Export: each tensor is gathered whole for a moment (one at a
time, so one tensor is the most any rank holds beyond its shard) and written at once by the rank
that owns it; the owners of contiguous runs of tensors write one safetensors file each, and rank 0
writes the index, the config and the tokenizer. The result is the layout ``save_pretrained``
writes for a sharded checkpoint, loadable with ``from_pretrained``.

Tensor names follow transformers: a checkpoint key is renamed to the model's key with the model's
own conversion mapping (GPT-NeoX's ``embed_out`` is ``lm_head`` in memory), and an export writes
each tensor under the key it was read from, as the model's own ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mezo_dist.errors import ConfigError
from mezo_dist.io import inside

INDEX = "model.safetensors.index.json"


def resolve_folder(name_or_path: str) -> Path:
    """The local folder of a model: the path itself, or the hub snapshot of ``org/name``
    (weights, config and tokenizer files only; the hub's own file locks serialise ranks)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))


class SafetensorsFolder:
    """The safetensors files of a model folder, their headers read once; tensors are read by
    element ranges (:mod:`mezo_dist.safetensors_io`), never memory-mapped."""

    def __init__(self, folder: Path) -> None:
        from mezo_dist.safetensors_io import Reader

        self.folder = folder
        index = folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            paths = {key: inside(folder, name, what=f"model folder {folder}: {INDEX}") for key, name in weight_map.items()}
            readers = {f: Reader(f) for f in sorted(set(paths.values()))}
            self._reader_of = {key: readers[f] for key, f in paths.items()}
        else:
            found = sorted(folder.glob("*.safetensors"))
            if not found:
                raise ConfigError(f"model folder {folder} has no safetensors weights (sharded start-up reads "
                                  "safetensors only; convert .bin checkpoints with save_pretrained first)")
            self._reader_of = {key: reader for reader in map(Reader, found) for key in reader.keys()}

    def keys(self) -> list[str]:
        return list(self._reader_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._reader_of[key].shape(key)

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Elements ``[start, start + out.numel())`` of the flattened tensor ``key`` into the
        flat tensor ``out``, reading only their bytes."""
        self._reader_of[key].read_into(key, start, out)


# A place a tensor lives in a module: (the module, its attribute name).
Slot = tuple[nn.Module, str]


def checkpoint_keys(model: nn.Module, files: SafetensorsFolder) -> dict[str, str]:
    """The model's state-dict keys mapped to the checkpoint keys they load from, with the model's
    own renaming rules (the conversion mapping ``from_pretrained`` applies). Conversions that
    change values (merging experts, transposes) are refused: a rank could not read its slice of
    a tensor that is made from others."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    out: dict[str, str] = {}
    for key in files.keys():
        target, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted is not None:
            raise ConfigError(f"checkpoint tensor {key} needs a value conversion on load ({converted}); "
                              "sharded start-up reads tensors as they are stored")
        if target in meta:
            out[target] = key
    return out


def slots_of(model: nn.Module, keys: dict[str, str]) -> dict[tuple[int, str], str]:
    """Every parameter and persistent buffer of ``model`` that the checkpoint holds, as
    (id of its module, attribute) -> checkpoint key. Modules keep their identity through peft's
    wrapping and FSDP2's sharding, so the map still finds them afterwards."""
    out = {}
    for prefix, module in model.named_modules():
        names = list(module._parameters) + [b for b in module._buffers if b not in module._non_persistent_buffers_set]
        for attr in names:
            full = f"{prefix}.{attr}" if prefix else attr
            if full in keys:
                out[(id(module), attr)] = keys[full]
    return out


def tensors(model: nn.Module) -> Iterator[tuple[str, Slot, torch.Tensor]]:
    """Each distinct parameter and buffer of ``model`` once: (first name, slot, tensor). A tied
    parameter is yielded under its first name with every slot tried by the caller."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield (f"{prefix}.{attr}" if prefix else attr), (module, attr), t


def slot_keys(model: nn.Module, sources: dict[tuple[int, str], str]) -> list[tuple[str, Slot, torch.Tensor, str | None]]:
    """(name, slot, tensor, checkpoint key or None) for each distinct tensor, a tied one under
    whichever of its slots the checkpoint names."""
    by_tensor: dict[int, str] = {}
    for _, module in model.named_modules():
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            key = sources.get((id(module), attr))
            if t is not None and key is not None:
                by_tensor.setdefault(id(t), key)
    return [(name, slot, t, by_tensor.get(id(t))) for name, slot, t in tensors(model)]


@contextmanager
def captured_parameters() -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Record every parameter registered while active, as (id of module, name) -> tensor.

    peft makes its adapters (LoRA matrices, a prefix) on the host, initialises them there and
    then moves them to the device of the base weights; on a meta skeleton that move drops the
    values. The tensors registered first still hold them, so every rank can set its own rows of
    the adapters to exactly what peft drew, from the same seed, without a loaded model."""
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def hook(module: nn.Module, name: str, param):
        if param is not None and not param.is_meta:
            seen.setdefault((id(module), name), param)

    handle = nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape, also for a ZeRO-3 parameter (whose ``shape`` is a placeholder)."""
    return tuple(getattr(t, "ds_shape", t.shape))


# What a rank holds of one tensor: (a flat, writable view of its elements, the offset of the
# first in the flattened tensor), or None when the tensor is not this engine's to fill.
Holding = Callable[[torch.Tensor], "tuple[torch.Tensor, int] | None"]


@torch.no_grad()
def load_into(model: nn.Module, sources: dict[tuple[int, str], str], files: SafetensorsFolder, held: Holding, *,
              adapters: dict[tuple[int, str], torch.Tensor] | None = None) -> None:
    """Fill what this rank holds of every tensor of ``model`` from the checkpoint (``sources``,
    from :func:`slots_of`) or, for tensors made after loading (peft's adapters), from
    ``adapters`` (from :func:`captured_parameters`). Reads only this rank's elements; no
    collective. A parameter that is in neither is an error: nothing is left uninitialised."""
    adapters = adapters or {}
    for name, (module, attr), t, key in slot_keys(model, sources):
        hold = held(t)
        if hold is None:
            continue
        local, offset = hold
        if key is not None:
            if files.shape(key) != full_shape(t):
                raise ConfigError(f"checkpoint tensor {key} has shape {files.shape(key)}, the model's {name} "
                                  f"{full_shape(t)}")
            files.read_into(key, offset, local)
            continue
        made = adapters.get((id(module), attr))
        if made is not None:
            local.copy_(made.detach().reshape(-1)[offset : offset + local.numel()])
        elif attr in module._parameters:
            raise ConfigError(f"the checkpoint has no tensor for parameter {name}; sharded start-up loads "
                              "every weight from it")


@dataclass(frozen=True)
class Entry:
    """One tensor of an export: its key on disk, where it lives, and the shape and dtype it is
    written with (what the placement's ``gather_tensor`` returns for it)."""

    key: str
    slot: Slot
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def export_entries(model: nn.Module, sources: dict[tuple[int, str], str],
                   dtype_of: Callable[[Slot], torch.dtype]) -> list[Entry]:
    """The tensors an export writes, each once, under the key it was loaded from: what the
    model's own ``save_pretrained`` writes (a tied parameter once, non-persistent buffers
    never). ``dtype_of``: the dtype the placement gathers a tensor in (``gathered_dtype``)."""
    return [Entry(key, slot, full_shape(t), dtype_of(slot)) for _, slot, t, key in slot_keys(model, sources)
            if key is not None]


def owners(entries: list[Entry], world: int) -> list[int]:
    """The rank that writes each entry: contiguous runs of about equal bytes, in order."""
    total = sum(e.nbytes for e in entries) or 1
    out, start = [], 0
    for e in entries:
        out.append(min(world - 1, start * world // total))
        start += e.nbytes
    return out


def file_names(owner_of: list[int]) -> dict[int, str]:
    """The file each writing rank writes: ``model.safetensors`` when one rank writes all,
    else ``model-0000i-of-0000n.safetensors`` as ``save_pretrained`` names shards."""
    writers = sorted(set(owner_of))
    if len(writers) == 1:
        return {writers[0]: "model.safetensors"}
    n = len(writers)
    return {r: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, r in enumerate(writers)}


def write_shards(entries: list[Entry], gather: Callable[[Slot], torch.Tensor], folder: Path, *, rank: int,
                 world: int) -> dict[str, str]:
    """Gather every entry in order (collective: ``gather`` returns the whole tensor on every
    rank) and write the ones this rank owns into its file in ``folder`` as they come: the file's
    header is laid out from the entries' shapes first, so no rank keeps more than the tensor in
    hand. Returns the index's weight map (the same on every rank)."""
    from contextlib import nullcontext

    from mezo_dist.safetensors_io import Writer

    owner_of = owners(entries, world)
    names = file_names(owner_of)
    writer = nullcontext()
    if rank in names:
        specs = {e.key: (e.shape, e.dtype) for e, owner in zip(entries, owner_of) if owner == rank}
        writer = Writer(folder / names[rank], specs, metadata={"format": "pt"})
    with writer:
        for entry, owner in zip(entries, owner_of):
            full = gather(entry.slot)
            if owner == rank:
                writer.write(entry.key, full)
            del full
    return {entry.key: names[owner] for entry, owner in zip(entries, owner_of)}


def write_index(folder: Path, weight_map: dict[str, str], entries: list[Entry]) -> None:
    """``model.safetensors.index.json`` for a checkpoint of several files (none for one)."""
    if len(set(weight_map.values())) < 2:
        return
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
