"""Safetensors files read and written by byte ranges: no memory map, no whole-file buffer.

The format is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape
and ``[begin, end)`` byte range in the data that follows), then the tensors' bytes, row-major.
So a flat range of a tensor's elements is one byte range of the file: a rank reads exactly its
own elements into its shard (:meth:`Reader.read_into`), and a writer that knows every tensor's
shape and dtype up front can write each tensor the moment it has it (:class:`Writer`), holding
one at a time.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a slice read touches
stays in the process's resident set while the file is open: a rank's start-up then held its
shard twice (its own copy, and the file's pages of the same rows). Reads with ``preadv`` go
through the page cache, which is the kernel's to reclaim.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

from mezo_dist.errors import ConfigError

# safetensors' dtype names, in the order of its own ``Dtype`` enum: ``save_file`` lays tensors out
# by that order, descending (the widest first, which keeps every tensor aligned), then by name.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "U64": torch.uint64,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
ORDER = {name: i for i, name in enumerate(DTYPES)}


def _check_byte_order() -> None:
    if sys.byteorder != "little":  # the format is little-endian; tensors' bytes are copied as they are
        raise ConfigError("safetensors files are little-endian; this host is big-endian")


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


class Reader:
    """One safetensors file: its header, and reads of element ranges of its tensors."""

    def __init__(self, path: str | Path) -> None:
        _check_byte_order()
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        self._data = 8 + length
        self._tensors = {key: (DTYPES[v["dtype"]], tuple(v["shape"]), int(v["data_offsets"][0]))
                         for key, v in header.items()}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key][1]

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Fill the flat tensor ``out`` with elements ``[start, start + out.numel())`` of the
        flattened tensor ``key``, converted to ``out``'s dtype: one read of exactly those bytes,
        straight into ``out`` where it is a host tensor of the file's dtype."""
        dtype, shape, begin = self._tensors[key]
        n = out.numel()
        if start < 0 or start + n > math.prod(shape):
            raise ValueError(f"{self.path}: elements [{start}, {start + n}) are outside {key} of shape {shape}")
        direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        buf = out if direct else torch.empty(n, dtype=dtype)
        if n:
            self._pread(_as_bytes(buf), self._data + begin + start * buf.element_size())
        if not direct:
            out.copy_(buf.view(out.shape))

    def _pread(self, view: memoryview, offset: int) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):  # a read may return fewer bytes than asked
                got = os.preadv(fd, [view[done:]], offset + done)
                if got == 0:
                    raise ConfigError(f"{self.path} is shorter than its header says")
                done += got
        finally:
            os.close(fd)


class Writer:
    """A safetensors file whose tensors (``specs``: key -> (shape, dtype)) are known up front and
    written one by one, in any order (:meth:`write`); ``close`` checks every one was. The layout
    and header are those ``safetensors.torch.save_file`` writes for the same tensors."""

    def __init__(self, path: str | Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], *,
                 metadata: dict[str, str] | None = None) -> None:
        _check_byte_order()
        order = sorted(specs, key=lambda k: (-ORDER[NAMES[specs[k][1]]], k))
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        self._where: dict[str, tuple[int, int]] = {}
        end = 0
        for key in order:
            shape, dtype = specs[key]
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
            self._where[key] = (end, size)
            end += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads it
        self._data = 8 + len(text)
        self._specs, self._left = specs, set(specs)
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self._data + end)
        self._pwrite(memoryview(struct.pack("<Q", len(text)) + text), 0)

    def write(self, key: str, t: torch.Tensor) -> None:
        """Write tensor ``key`` (its whole value, of the shape and dtype given up front)."""
        shape, dtype = self._specs[key]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{key}: got {tuple(t.shape)} {t.dtype}, the header says {tuple(shape)} {dtype}")
        begin, size = self._where[key]
        if size:
            self._pwrite(_as_bytes(t.detach().to("cpu").contiguous()), self._data + begin)
        self._left.discard(key)

    def close(self) -> None:
        """Flush to storage and close; every tensor must have been written."""
        try:
            if self._left:
                raise RuntimeError(f"{self.path}: tensors never written: {sorted(self._left)[:5]}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, kind, *_) -> None:
        # A failure on the way (a gather that raised) leaves an incomplete file, which the caller's
        # temporary folder holds; only the descriptor needs closing then.
        if kind is None:
            self.close()
        else:
            os.close(self._fd)

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
