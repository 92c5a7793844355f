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
    placement.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
