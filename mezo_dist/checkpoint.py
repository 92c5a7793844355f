"""Sharded training checkpoints that load on any world size and any backend.

A checkpoint stores the trainable parameters as flat chunks ``(name, offset, count)`` of the full
flattened parameter, exactly as each rank holds them (its :class:`Piece` views), in one
safetensors file per rank. Loading asks, for every local piece, for the chunks that overlap its
range: a 2-rank FSDP2 checkpoint loads into 1 process, a 1-process one into 2-rank ZeRO-3. The
same offsets are what make the noise layout-invariant, so one idea serves both.

Layout of ``checkpoint-<step>/``:
    rank-00000.safetensors ...   this rank's chunks, keyed ``<name>|<offset>``
    index.json                   every chunk's file, key, offset and count; file sizes and sha256
    trainer_state.json           step, seeds, schedule, skipped steps, model fingerprint

The folder is written as ``.checkpoint-<step>.tmp`` and renamed once every rank has written and
rank 0 has verified the files: a folder named ``checkpoint-*`` with an ``index.json`` is complete.
Only safetensors and JSON are read back: nothing is unpickled, and every file the index names
must lie inside the checkpoint folder. Each file's sha256 is computed while it is written and
checked by the rank that reads it, so a flipped byte or a swapped file is an error naming the
file. (``sha256`` is an optional field of the ``mezo_dist-flat-v1`` index: checkpoints written
before it existed load as they did, with the size check only.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from mezo_dist.errors import ConfigError
from mezo_dist.io import atomic_write_text, fresh_folder_beside, inside, publish_folder, sha256_file
from mezo_dist.placement.base import Piece, Placement
from mezo_dist.safetensors_io import NAMES

if TYPE_CHECKING:
    from mezo_dist.config import TrainConfig

FORMAT = "mezo_dist-flat-v1"
_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def fingerprint(pieces: list[Piece]) -> str:
    """A digest of the trainable parameters' names and sizes: which model a checkpoint fits."""
    text = "\n".join(f"{p.name}:{p.full_numel}" for p in sorted(pieces, key=lambda p: p.name))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def owns_piece(piece: Piece, state) -> bool:
    """Whether this rank writes ``piece``: a replica once (rank 0); a shard once per element, so
    under hybrid sharding only the first replica group (ranks 0 .. world / replicas - 1)."""
    if not piece.shard:
        return state.rank == 0
    return state.rank < state.world_size // max(1, getattr(state, "hsdp_replicas", 1))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write ``tensors`` in the safetensors format, one tensor at a time, and return the file's
    sha256, computed over the bytes as they are written.

    ``safetensors.torch.save_file`` first copies every tensor into one bytes object and offers no
    digest, so a checksum would cost a copy of the shard and a second pass over the file. The
    format is small: an 8-byte little-endian header length, a JSON header (each tensor's dtype,
    shape and byte range; padded with spaces to 8 bytes), then the raw little-endian data. Files
    are read back by byte ranges (:mod:`mezo_dist.safetensors_io`); the safetensors library loads
    them too.
    """
    header: dict[str, Any] = {}
    offset = 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for part in (struct.pack("<Q", len(raw)), raw):
            f.write(part)
            digest.update(part)
        for t in tensors.values():
            # One tensor on the host at a time; on CPU a view of the tensor itself, no copy.
            data = memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def save_checkpoint(placement: Placement, path: str | Path, trainer_state: dict[str, Any], *,
                    before_publish: Sequence[Callable[[], None]] = ()) -> Path:
    """Write a checkpoint of the trainable parameters and ``trainer_state``. Collective.

    ``before_publish``: called once this rank's file is written, before the folder is published
    (the tests' rank that dies mid-save, ``faults.py``)."""
    state = placement.state
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    if state.is_main:
        fresh_folder_beside(final, "tmp")
    state.barrier()

    pieces = placement.pieces()
    file = f"rank-{state.rank:05d}.safetensors"
    tensors, chunks = {}, []
    for p in pieces:
        if owns_piece(p, state) and p.local.numel() > 0:
            key = f"{p.name}|{p.offset}"
            tensors[key] = p.local
            chunks.append([p.name, file, key, p.offset, p.local.numel()])
    digest = write_safetensors(tmp / file, tensors, {"format": FORMAT})
    size = (tmp / file).stat().st_size
    for hook in before_publish:
        hook()
    everyone = state.all_gather_object({"chunks": chunks, "file": file, "size": size, "sha256": digest})
    if state.is_main:
        index: dict[str, Any] = {"format": FORMAT, "params": {p.name: p.full_numel for p in pieces},
                                 "files": {}, "chunks": {}, "sha256": {}}
        for part in everyone:
            index["files"][part["file"]] = part["size"]
            index["sha256"][part["file"]] = part["sha256"]
            for name, f, key, offset, count in part["chunks"]:
                index["chunks"].setdefault(name, []).append([f, key, offset, count])
        check_coverage(index, where=str(final))
        trainer_state = dict(trainer_state, fingerprint=fingerprint(pieces), world_size=state.world_size)
        text = json.dumps(trainer_state, indent=2) + "\n"
        atomic_write_text(tmp / STATE_FILE, text)
        index["sha256"][STATE_FILE] = hashlib.sha256(text.encode()).hexdigest()
        atomic_write_text(tmp / "index.json", json.dumps(index) + "\n")
        publish_folder(tmp, final)
    state.barrier()
    return final


def check_coverage(index: dict[str, Any], *, where: str) -> None:
    """Every parameter of the index covered by its chunks, once, from element 0 to its end."""
    for name, numel in index["params"].items():
        covered = 0
        for _, _, offset, count in sorted(index["chunks"].get(name, []), key=lambda c: c[2]):
            if offset != covered:
                raise ConfigError(f"checkpoint {where} does not cover parameter {name} at element {covered}")
            covered += count
        if covered != numel:
            raise ConfigError(f"checkpoint {where} covers {covered} of {numel} elements of {name}")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_index(index: Any, path: Path) -> None:
    """The index's shape, before anything in it is used: every key present with the right type,
    every named file inside the checkpoint folder, every chunk keyed by its name and offset."""
    bad = f"checkpoint {path} has a malformed index.json:"
    if not isinstance(index, dict):
        raise ConfigError(f"{bad} not a JSON object")
    for key in ("format", "params", "files", "chunks"):
        if key not in index:
            raise ConfigError(f"{bad} it lacks {key!r}")
    if index["format"] != FORMAT:
        raise ConfigError(f"checkpoint {path} has format {index['format']!r}, expected {FORMAT}")
    for key in ("params", "files", "chunks"):
        if not isinstance(index[key], dict):
            raise ConfigError(f"{bad} {key!r} is not an object")
    for name, numel in index["params"].items():
        if not _count(numel):
            raise ConfigError(f"{bad} parameter {name} has size {numel!r}")
    for file, size in index["files"].items():
        inside(path, file, what=f"checkpoint {path} index.json")
        if not _count(size):
            raise ConfigError(f"{bad} file {file} has size {size!r}")
    for name, chunks in index["chunks"].items():
        if name not in index["params"] or not isinstance(chunks, list):
            raise ConfigError(f"{bad} chunks of {name!r} do not match its params")
        for c in chunks:
            ok = (isinstance(c, list) and len(c) == 4 and c[0] in index["files"] and _count(c[2]) and _count(c[3])
                  and c[3] > 0 and c[1] == f"{name}|{c[2]}")
            if not ok:
                raise ConfigError(f"{bad} chunk {c!r} of {name} is not [listed file, '<name>|<offset>', offset, count]")
    digests = index.get("sha256", {})
    if not isinstance(digests, dict) or not all(
        (f in index["files"] or f == STATE_FILE) and isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d)
        for f, d in digests.items()
    ):
        raise ConfigError(f"{bad} 'sha256' is not an object of listed files and hex digests")


def _check_trainer_state(state: Any, path: Path) -> None:
    bad = f"checkpoint {path} has a malformed {STATE_FILE}:"
    if not isinstance(state, dict):
        raise ConfigError(f"{bad} not a JSON object")
    for key in ("step", "skipped_steps"):
        if not _count(state.get(key)):
            raise ConfigError(f"{bad} {key!r} is {state.get(key, 'missing')!r}, not a count")
    if not isinstance(state.get("run", {}), dict):
        raise ConfigError(f"{bad} 'run' is not an object")
    best = state.get("best")
    if best is not None and not (isinstance(best, list) and len(best) == 2 and isinstance(best[0], (int, float))
                                 and _count(best[1])):
        raise ConfigError(f"{bad} 'best' is {best!r}, not [metric, step]")


def read_checkpoint_meta(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index, trainer_state) of a checkpoint, checked for shape and completeness (sizes; the
    sha256 of each data file is checked by the rank that reads it). No process group needed."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        index = json.loads((path / "index.json").read_text(encoding="utf-8"))
        state_text = (path / STATE_FILE).read_text(encoding="utf-8")
        trainer_state = json.loads(state_text)
    except FileNotFoundError as e:
        raise ConfigError(f"checkpoint {path} is incomplete: {Path(e.filename).name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {path} is unreadable: {e}") from None
    _check_index(index, path)
    want = index.get("sha256", {}).get(STATE_FILE)
    if want is not None and hashlib.sha256(state_text.encode()).hexdigest() != want:
        raise ConfigError(f"checkpoint {path} is corrupt: {STATE_FILE} does not match its sha256")
    _check_trainer_state(trainer_state, path)
    for file, size in index["files"].items():
        f = path / file
        if not f.is_file():
            raise ConfigError(f"checkpoint {path} is incomplete: {file} is missing")
        if f.stat().st_size != size:
            raise ConfigError(f"checkpoint {path} is truncated: {file} has {f.stat().st_size} of {size} bytes")
    check_coverage(index, where=str(path))
    return index, trainer_state


@torch.no_grad()
def load_checkpoint(placement: Placement, path: str | Path) -> dict[str, Any]:
    """Fill this rank's pieces from a checkpoint saved on any layout; returns its trainer state.

    Collective: a rank that finds a problem in the files it reads (each is checked against its
    sha256 first) tells the others, and every rank raises the same one-line error."""
    path = Path(path)
    index, trainer_state = read_checkpoint_meta(path)
    error = None
    try:
        _fill(placement, path, index)
    except ConfigError as e:
        error = str(e)
    errors = [e for e in placement.state.all_gather_object(error) if e]
    if errors:
        raise ConfigError(errors[0])
    placement.after_edit()
    return trainer_state


def _fill(placement: Placement, path: Path, index: dict[str, Any]) -> None:
    # Plain reads of each chunk's bytes into the piece: a memory map would keep the file's pages
    # of every chunk read resident beside the pieces, the rank's share twice.
    from mezo_dist.safetensors_io import Reader

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
    digests = index.get("sha256", {})
    handles: dict[str, Any] = {}
    file = "?"
    try:
        for p in pieces:
            lo, hi = p.offset, p.offset + p.local.numel()
            for file, key, offset, count in index["chunks"][p.name]:
                a, b = max(lo, offset), min(hi, offset + count)
                if a >= b:
                    continue
                if file not in handles:
                    where = inside(path, file, what=f"checkpoint {path} index.json")
                    if file in digests and sha256_file(where) != digests[file]:
                        raise ConfigError(f"checkpoint {path} is corrupt: {file} does not match its sha256")
                    handles[file] = Reader(where)
                shape = handles[file].shape(key)
                if shape != (count,):
                    raise ConfigError(f"checkpoint {path} is corrupt: {file} holds {key} with shape "
                                      f"{list(shape)}, the index says [{count}]")
                handles[file].read_into(key, a - offset, p.local[a - lo : b - lo])
    except ConfigError:
        raise
    except Exception as e:  # a corrupt file surfaces here, from the reader
        raise ConfigError(f"checkpoint {path} is corrupt: {file}: {type(e).__name__}: {e}") from None


def resume_fields(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The resume policy: what a resumed run of ``world_size`` ranks must share with the run that
    wrote the checkpoint, for equal results (``trainer_state.json``'s ``run``). A key that older
    checkpoints lack is written only when it differs from what its absence meant. Reads the
    train file (its sha256)."""
    from mezo_dist.data import file_digest

    optim, zo, bp, t = cfg.optim, cfg.zo, cfg.bp, cfg.task
    fields = {
        "seed": cfg.run.seed,  # the run seed (a trajectory row's "seed" is its step seed)
        "zo_eps": zo.zo_eps, "weight_decay": optim.weight_decay,
        "learning_rate": optim.learning_rate, "lr_scheduler_type": optim.lr_scheduler_type,
        "warmup_steps": optim.warmup_steps, "max_length": cfg.data.max_length,
        "global_batch": cfg.run.per_device_train_batch_size * world_size * cfg.run.gradient_accumulation_steps,
        "trainer": bp.trainer,
    }
    if zo.zo_num_directions != 1:
        fields["zo_num_directions"] = zo.zo_num_directions
    if zo.zo_perturbation != "gaussian":  # absent from older checkpoints: gaussian
        fields["zo_perturbation"] = zo.zo_perturbation
    if zo.zo_optimizer != "mezo":  # absent from older checkpoints: mezo
        from mezo_dist.zo.optimizers import hyper_from_args

        fields.update(zo_optimizer=zo.zo_optimizer, **hyper_from_args(zo.zo_optimizer, zo))
    if cfg.model.mixed_precision:
        fields["precision"] = cfg.model.precision
    if bp.trainer == "regular":
        fields.update(optim=bp.optim, adam_beta1=bp.adam_beta1, adam_beta2=bp.adam_beta2,
                      adam_epsilon=bp.adam_epsilon, momentum=bp.momentum, max_grad_norm=bp.max_grad_norm)
    if cfg.data.train_file is not None:
        fields["train_file_sha256"] = file_digest(cfg.data.train_file)
    else:
        fields.update(task_name=t.task_name, template=t.template, num_train=t.num_train, num_dev=t.num_dev,
                      train_set_seed=t.train_set_seed, train_as_classification=t.train_as_classification,
                      non_diff=t.non_diff, objective=t.objective)
    if optim.lr_scheduler_type != "constant":
        fields["max_steps"] = cfg.run.max_steps  # the schedule depends on it
    return fields


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


def resume_hint(output_dir: str | Path) -> str:
    """Where ``--resume_from_checkpoint latest`` would start from now (for an interrupted run)."""
    found = list_checkpoints(output_dir)
    if found:
        return f"--resume_from_checkpoint latest resumes from {found[-1]}"
    return f"no complete checkpoint in {output_dir}: a rerun starts from step 0"


# What a training run leaves in its output folder, and which of those mean it finished.
RUN_MARKERS = ("trajectory.jsonl", "final", "train_results.json", "eval_results.json")
FINISHED_MARKERS = ("final", "train_results.json", "eval_results.json")


def run_markers(output_dir: str | Path, names: tuple[str, ...] = RUN_MARKERS) -> list[str]:
    """The outputs of a previous run found in ``output_dir`` (its complete checkpoints included)."""
    out = Path(output_dir)
    found = [n for n in names if (out / n).exists()]
    if names is RUN_MARKERS:
        found += [c.name for c in list_checkpoints(out)]
    return found
