"""Gathered Hugging Face exports of a placed model, written atomically.

The folder appears under its final name only once complete (written beside it under a
temporary name, then renamed), so a crash mid-write never leaves a folder that looks valid.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mezo_dist.placement.base import Placement


def save_pretrained(placement: Placement, tokenizer, path: str | Path) -> None:
    """Gather the model (collective) and write ``path`` in Hugging Face format from rank 0."""
    state_dict = placement.full_state_dict()
    if not placement.state.is_main:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if not _save_prompt_learning(placement.module, state_dict, tmp):
        placement.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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
    folder.mkdir(parents=True)
    save_file({"prompt_embeddings": state_dict[key].contiguous()}, str(folder / "adapter_model.safetensors"))
    saved = copy.copy(config)
    saved.inference_mode = True
    saved.save_pretrained(str(folder))
    return True
