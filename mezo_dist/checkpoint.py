"""Sharded training checkpoints that load on any world size and any backend.

A checkpoint stores the trainable parameters as flat chunks ``(name, offset, count)`` of the full
flattened parameter, exactly as each rank holds them (its :class:`Piece` views), in one
safetensors file per rank. Loading asks, for every local piece, for the chunks that overlap its
range: a 2-rank FSDP2 checkpoint loads into 1 process, a 1-process one into 2-rank ZeRO-3. The
same offsets are what make the noise layout-invariant, so one idea serves both.

Layout of ``checkpoint-<step>/``:
    rank-00000.safetensors ...   this rank's chunks, keyed ``<name>|<offset>``
    index.json                   every chunk's file, key, offset and count; file sizes
    trainer_state.json           step, seeds, schedule, skipped steps, model fingerprint

The folder is written as ``.checkpoint-<step>.tmp`` and renamed once every rank has written and
rank 0 has verified the files: a folder named ``checkpoint-*`` with an ``index.json`` is complete.
Only safetensors and JSON are read back: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mezo_dist import faults
from mezo_dist.errors import ConfigError
from mezo_dist.metrics import atomic_write_text
from mezo_dist.placement.base import Piece, Placement

FORMAT = "mezo_dist-flat-v1"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def fingerprint(pieces: list[Piece]) -> str:
    """A digest of the trainable parameters' names and sizes: which model a checkpoint fits."""
    text = "\n".join(f"{p.name}:{p.full_numel}" for p in sorted(pieces, key=lambda p: p.name))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _owned(piece: Piece, state) -> bool:
    """Whether this rank writes ``piece``: a replica once (rank 0); a shard once per element, so
    under hybrid sharding only the first replica group (ranks 0 .. world / replicas - 1)."""
    if not piece.shard:
        return state.rank == 0
    return state.rank < state.world_size // max(1, getattr(state, "hsdp_replicas", 1))


def save_checkpoint(placement: Placement, path: str | Path, trainer_state: dict[str, Any]) -> Path:
    """Write a checkpoint of the trainable parameters and ``trainer_state``. Collective."""
    from safetensors.torch import save_file

    state = placement.state
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    if state.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()

    pieces = placement.pieces()
    file = f"rank-{state.rank:05d}.safetensors"
    tensors, chunks = {}, []
    for p in pieces:
        if _owned(p, state) and p.local.numel() > 0:
            key = f"{p.name}|{p.offset}"
            tensors[key] = p.local.detach().to("cpu").clone()
            chunks.append([p.name, file, key, p.offset, p.local.numel()])
    save_file(tensors, str(tmp / file), metadata={"format": FORMAT})
    size = (tmp / file).stat().st_size
    faults.maybe_die_in_save(state.rank)
    everyone = _gather({"chunks": chunks, "file": file, "size": size})
    if state.is_main:
        index: dict[str, Any] = {"format": FORMAT, "params": {p.name: p.full_numel for p in pieces},
                                 "files": {}, "chunks": {}}
        for part in everyone:
            index["files"][part["file"]] = part["size"]
            for name, f, key, offset, count in part["chunks"]:
                index["chunks"].setdefault(name, []).append([f, key, offset, count])
        _check_coverage(index, where=str(final))
        trainer_state = dict(trainer_state, fingerprint=fingerprint(pieces), world_size=state.world_size)
        atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2) + "\n")
        atomic_write_text(tmp / "index.json", json.dumps(index) + "\n")
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _check_coverage(index: dict[str, Any], *, where: str) -> None:
    for name, numel in index["params"].items():
        covered = 0
        for _, _, offset, count in sorted(index["chunks"].get(name, []), key=lambda c: c[2]):
            if offset != covered:
                raise ConfigError(f"checkpoint {where} does not cover parameter {name} at element {covered}")
            covered += count
        if covered != numel:
            raise ConfigError(f"checkpoint {where} covers {covered} of {numel} elements of {name}")


def read_checkpoint_meta(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index, trainer_state) of a checkpoint, checked for completeness. No process group needed."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        index = json.loads((path / "index.json").read_text())
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"checkpoint {path} is incomplete: {Path(e.filename).name} is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {path} is unreadable: {e}") from None
    if index.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} has format {index.get('format')!r}, expected {FORMAT}")
    for file, size in index["files"].items():
        f = path / file
        if not f.is_file():
            raise ConfigError(f"checkpoint {path} is incomplete: {file} is missing")
        if f.stat().st_size != size:
            raise ConfigError(f"checkpoint {path} is truncated: {file} has {f.stat().st_size} of {size} bytes")
    _check_coverage(index, where=str(path))
    return index, trainer_state


@torch.no_grad()
def load_checkpoint(placement: Placement, path: str | Path) -> dict[str, Any]:
    """Fill this rank's pieces from a checkpoint saved on any layout; returns its trainer state."""
    from safetensors import safe_open

    path = Path(path)
    index, trainer_state = read_checkpoint_meta(path)
    pieces = placement.pieces()
    mine = {p.name: p.full_numel for p in pieces}
    theirs = index["params"]
    if mine != theirs:
        missing = sorted(set(theirs) - set(mine))
        extra = sorted(set(mine) - set(theirs))
        sized = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])
        what = (f"parameter {missing[0]} is not in the model" if missing else
                f"the model's parameter {extra[0]} is not in the checkpoint" if extra else
                f"parameter {sized[0]} has {theirs[sized[0]]} elements there and {mine[sized[0]]} here")
        raise ConfigError(f"checkpoint {path} is from another model: {what}")
    handles: dict[str, Any] = {}
    try:
        for p in pieces:
            lo, hi = p.offset, p.offset + p.local.numel()
            for file, key, offset, count in index["chunks"][p.name]:
                a, b = max(lo, offset), min(hi, offset + count)
                if a >= b:
                    continue
                if file not in handles:
                    handles[file] = safe_open(str(path / file), framework="pt", device="cpu")
                src = handles[file].get_slice(key)[a - offset : b - offset]
                p.local[a - lo : b - lo].copy_(src)
    except Exception as e:  # a corrupt file surfaces here, from the safetensors reader
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"checkpoint {path} is corrupt: {type(e).__name__}: {e}") from None
    placement.after_edit()
    return trainer_state


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in out.iterdir() if (m := _NAME.match(d.name)) and (d / "index.json").exists()]
    return [d for _, d in sorted(found)]


def rotate_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Keep the latest ``keep`` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
