"""Files and folders that appear whole or not at all, and paths kept inside their folder.

Every output of a run (trajectory rewrites, metrics, checkpoints, exports, cached assets) is
written under a hidden temporary name beside its final one and renamed into place, so a crash or
an interrupt at any moment leaves either the old version or the new one. Every file name read
from a file the user did not type (a checkpoint index, a model's weight index) goes through
:func:`inside`, so such a file can only ever point into its own folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mezo_dist import interrupt
from mezo_dist.errors import ConfigError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write then rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write or the rename failed


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def fresh_folder_beside(final: str | Path, tag: str) -> Path:
    """An empty hidden folder ``.<name>.<tag>`` next to ``final``, to be published by
    :func:`publish_folder` once complete (a leftover of an earlier crash is cleared first)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: str | Path, final: str | Path, *, replace: bool = True) -> bool:
    """Rename the complete folder ``tmp`` to ``final``.

    Args:
        replace: an existing ``final`` folder is moved aside, then removed once ``tmp`` holds its
            name. Without it an existing ``final`` wins (another process published the same
            thing first) and ``tmp`` is removed; returns whether ``tmp`` was published.
    """
    tmp, final = Path(tmp), Path(final)
    if final.exists() and not final.is_dir():
        # Never moved aside: whatever that file is, this code did not make it.
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"{final} is a file, not a folder; it was left as it is")
    if not replace:
        try:
            os.replace(tmp, final)  # fails on a non-empty final
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    # Between the two renames the final name is missing: an interrupt must not land there.
    with interrupt.deferred():
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return True


def inside(folder: str | Path, name: Any, *, what: str) -> Path:
    """``folder / name``, refused unless ``name`` is a relative path that stays inside ``folder``
    (after following symbolic links). ``what`` names the file that holds ``name``, for the error."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ConfigError(f"{what} names {name!r}, which is not a file name")
    if Path(name).is_absolute():
        raise ConfigError(f"{what} names the absolute path {name!r}; only files inside {folder} are read")
    base = Path(folder).resolve()
    target = (base / name).resolve()
    if target == base or base not in target.parents:
        raise ConfigError(f"{what} names {name!r}, which is outside {folder}")
    return Path(folder) / name


def json_lines(path: str | Path, *, what: str, cut_last: bool = False) -> list[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file, as one-line
    ConfigErrors naming ``what`` and ``path`` when it is not UTF-8 text or a line is not JSON.

    Args:
        cut_last: drop a last line that does not parse (one a crash cut short) instead.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} is not readable UTF-8 text: {e}") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError:
            if cut_last and n == len(lines):
                break
            raise ConfigError(f"{what} {path} is not JSON Lines: line {n} is not JSON") from None
    return out


def sha256_file(path: str | Path, *, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in blocks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def check_writable_folder(path: str | Path, *, flag: str) -> None:
    """Refuse a path that is a file, or whose nearest existing folder cannot be written, before
    anything is computed. Reads permissions only; nothing is created."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{flag} {path} cannot be made: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} is not writable ({probe} does not allow writing)")


def folder_entries(path: str | Path) -> list[str]:
    """Names in ``path`` (empty when it does not exist)."""
    p = Path(path)
    return sorted(e.name for e in p.iterdir()) if p.is_dir() else []
