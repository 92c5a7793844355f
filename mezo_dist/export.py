"""Hugging Face exports of a placed model, written atomically.

A sharded placement (FSDP2, ZeRO-3) exports per rank (:mod:`mezo_dist.hf_shards`): each tensor
is gathered on its own and written at once by the rank that owns it, so a rank holds its shard
and one tensor, never the model;
a peft model exports its adapters only, gathered one at a time. A replica (``single``) writes
the model it holds.

The folder appears under its final name only once complete (written beside it under a
temporary name, then renamed), so a crash mid-write never leaves a folder that looks valid.
An export never replaces what it did not make: :func:`check_export_dir` refuses a target that
is a file or a folder holding anything, unless asked to overwrite.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mezo_dist.checkpoint import run_markers
from mezo_dist.errors import ConfigError
from mezo_dist.io import check_writable_folder, folder_entries, fresh_folder_beside, publish_folder
from mezo_dist.placement.base import Placement


def check_export_dir(path: str | Path, *, overwrite: bool, flag: str = "--output_dir") -> None:
    """Refuse, before any work, an export target that is a file, cannot be written, or is a
    non-empty folder (a training run above all) when ``overwrite`` is not set. No I/O but reads."""
    check_writable_folder(path, flag=flag)
    entries = folder_entries(path)
    if entries and not overwrite:
        run = run_markers(path)
        what = f"a training run ({', '.join(run[:3])})" if run else f"{len(entries)} entries ({', '.join(entries[:3])})"
        raise ConfigError(f"{flag} {path} already holds {what}; pick another folder, or pass "
                          "--overwrite_output_dir to replace it")


def save_pretrained(placement: Placement, tokenizer, path: str | Path) -> None:
    """Write ``path`` in Hugging Face format (collective)."""
    if placement.checkpoint_sources is not None:
        _save_sharded(placement, tokenizer, Path(path))
        return
    state_dict = placement.full_state_dict()
    if not placement.state.is_main:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_folder_beside(path, f"tmp-{os.getpid()}")
    _share_tied(placement.module, state_dict)
    if not _save_prompt_learning(placement.module, state_dict, tmp):
        placement.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    publish_folder(tmp, path)


def _save_sharded(placement: Placement, tokenizer, path: Path) -> None:
    """Every rank writes its part into one temporary folder (made by rank 0, on storage every
    rank sees, as for checkpoints); rank 0 adds the index, config and tokenizer and publishes."""
    from mezo_dist import hf_shards

    state, module = placement.state, placement.module
    tmp = None
    if state.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_folder_beside(path, f"tmp-{os.getpid()}")
    tmp = Path(state.all_gather_object(str(tmp) if tmp else None)[0])
    if _is_peft(module):
        # Adapters only, as peft saves them: small, so rank 0 holds them all.
        state_dict = {}
        for name, slot, t in hf_shards.tensors(module):
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                full = placement.gather_tensor(slot)
                if state.is_main:
                    state_dict[name] = full.detach().to("cpu", copy=True)
        if state.is_main and not _save_prompt_learning(module, state_dict, tmp):
            module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    else:
        entries = hf_shards.export_entries(module, placement.checkpoint_sources, placement.gathered_dtype)
        weight_map = hf_shards.write_shards(entries, placement.gather_tensor, tmp, rank=state.rank,
                                            world=state.world_size)
        if state.is_main:
            hf_shards.write_index(tmp, weight_map, entries)
            _save_config(module, tmp)
    state.barrier()  # every rank's file is in the folder
    if state.is_main:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        publish_folder(tmp, path)
    state.barrier()  # the export exists for every rank once this returns


def _is_peft(module) -> bool:
    return hasattr(module, "peft_config")


def _save_config(module, folder: Path) -> None:
    """The config (and generation config) ``save_pretrained`` writes beside the weights, naming
    the model's own class rather than the wrapper class FSDP2 makes of it."""
    import copy

    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    cls = next(c for c in type(module).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    config = copy.deepcopy(module.config)
    config.architectures = [cls.__name__]
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(folder)
    generation = getattr(module, "generation_config", None)
    if generation is not None and module.can_generate():
        generation.save_pretrained(folder)


def _share_tied(module, state_dict: dict) -> None:
    """Point every name of a tied parameter (Llama's embeddings and LM head) at one tensor again.

    Gathering copies each name apart, and ``save_pretrained`` finds ties by shared storage: given
    the copies, it would write both names where the model's own save writes the one it reloads
    from."""
    first: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        kept = first.setdefault(id(p), name)
        if kept != name and kept in state_dict and name in state_dict:
            state_dict[name] = state_dict[kept]


def _save_prompt_learning(module, state_dict: dict, folder: Path) -> bool:
    """A prefix in peft's format, from the gathered state dict.

    peft's own ``save_pretrained`` reads a prompt-learning model's live prefix (and runs its
    encoder), which under FSDP2 or ZeRO-3 is a shard, not the whole prefix."""
    import copy

    config = getattr(module, "peft_config", {}).get(getattr(module, "active_adapter", None))
    if config is None or not config.is_prompt_learning:
        return False
    from safetensors.torch import save_file

    key = f"prompt_encoder.{module.active_adapter}.embedding.weight"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": state_dict[key].contiguous()}, str(folder / "adapter_model.safetensors"))
    saved = copy.copy(config)
    saved.inference_mode = True
    saved.save_pretrained(str(folder))
    return True
