"""Safetensors, one tensor at a time: what lets a re-merge run in the memory of a few adapters.

A forget rewrites the served model (540 MB for the builtin model) and the merge's integer sums.
Holding the base, a copy of it, the sums and the merged weights at once took over 2 GB and most
of the re-merge's time; here every file is read and written tensor by tensor:

- `TensorFile` reads a safetensors file's header itself and returns one tensor (or copies its raw
  bytes to another file) on demand, never the whole file.
- `StreamWriter` writes a safetensors file in a planned order. Its header goes first in the
  format, but the size of a packed tensor is known only once it is computed, so the writer
  reserves the largest header the plan can need and pads the real one with spaces (JSON
  whitespace, as safetensors itself pads its headers to 8 bytes).
- `pack_int64` / `unpack_int64` store the int64 sums losslessly in the fewest little-endian
  bytes per value that hold the tensor's range (5 for the builtin model at 40 fixed-point bits,
  down from 8): 531 MB beside a 538 MB served model instead of 849 MB.

Hashes of tensors copied or written here equal `sift.hashing.tensor_sha256` of the same tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO

import torch

from sift.errors import SiftError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
_CHUNK = 1 << 24  # bytes per read/write when copying raw tensor data

if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian; so is every CPU sift runs on
    raise ImportError("sift's streaming merge needs a little-endian machine")


class Entry:
    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], start: int, end: int):
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end


def _hash_prefix(dtype: str, shape: tuple[int, ...]) -> bytes:
    return f"{DTYPES[dtype]}|{tuple(shape)}|".encode()


class TensorFile:
    """A safetensors file opened for reading single tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._fh: BinaryIO = open(self.path, "rb")
            (n,) = struct.unpack("<Q", self._fh.read(8))
            if n > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(self._fh.read(n))
        except (OSError, ValueError, struct.error) as exc:
            raise SiftError(f"{self.path} is not a readable safetensors file: {exc}") from None
        self.data_start = 8 + n
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, Entry] = {}
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise SiftError(f"{self.path}: tensor {name} has dtype {e.get('dtype')!r}, which sift does not read")
            start, end = e["data_offsets"]
            self.entries[name] = Entry(e["dtype"], tuple(int(x) for x in e["shape"]), int(start), int(end))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def names(self) -> list[str]:
        """Tensor names in the order their data lies in the file."""
        return sorted(self.entries, key=lambda k: self.entries[k].start)

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        self._fh.seek(self.data_start + e.start)
        data = bytearray(self._fh.read(e.end - e.start))
        if len(data) != e.end - e.start:
            raise SiftError(f"{self.path} is truncated (tensor {name})")
        if not data:
            return torch.empty(e.shape, dtype=DTYPES[e.dtype])
        return torch.frombuffer(data, dtype=DTYPES[e.dtype]).reshape(e.shape)

    def sha256(self, name: str, out: BinaryIO | None = None) -> str:
        """`tensor_sha256` of one tensor from its raw bytes, optionally copying them to `out`."""
        e = self.entries[name]
        h = hashlib.sha256(_hash_prefix(e.dtype, e.shape))
        self._fh.seek(self.data_start + e.start)
        left = e.end - e.start
        while left:
            chunk = self._fh.read(min(_CHUNK, left))
            if not chunk:
                raise SiftError(f"{self.path} is truncated (tensor {name})")
            h.update(chunk)
            if out is not None:
                out.write(chunk)
            left -= len(chunk)
        return h.hexdigest()


class StreamWriter:
    """Writes a safetensors file tensor by tensor, in the order of `plan` ((name, dtype code,
    largest shape) each). The file is complete and fsynced only after `close()`."""

    def __init__(
        self, path: Path, plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ):
        self.path = Path(path)
        self._plan = plan
        self._metadata = {"format": "pt", **(metadata or {})}
        worst = sum(_nbytes(d, s) for _, d, s in plan)
        bound = {name: {"dtype": d, "shape": list(s), "data_offsets": [worst, worst]} for name, d, s in plan}
        self._reserved = _padded_len(len(self._header_bytes(bound)))
        self._fh: BinaryIO = open(self.path, "wb")
        self._fh.write(b"\0" * (8 + self._reserved))
        self._written: dict[str, dict[str, Any]] = {}
        self._offset = 0

    def _header_bytes(self, entries: dict[str, Any]) -> bytes:
        return json.dumps({"__metadata__": self._metadata, **entries}, sort_keys=True, separators=(",", ":")).encode()

    def _next(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        i = len(self._written)
        if i >= len(self._plan) or self._plan[i][0] != name:
            raise RuntimeError(f"StreamWriter: {name} written out of plan order")
        _, _, worst = self._plan[i]
        if _nbytes(dtype, shape) > _nbytes(self._plan[i][1], worst) or len(shape) != len(worst):
            raise RuntimeError(f"StreamWriter: {name} is larger than planned")

    def write(self, name: str, tensor: torch.Tensor) -> str:
        """Append one tensor; returns its `tensor_sha256`."""
        t = tensor.detach().contiguous()
        dtype, shape = CODES[t.dtype], tuple(t.shape)
        self._next(name, dtype, shape)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self._fh.write(data)
        self._record(name, dtype, shape, len(data))
        return hashlib.sha256(_hash_prefix(dtype, shape) + data).hexdigest()

    def copy(self, name: str, source: TensorFile, source_name: str | None = None) -> str:
        """Append one tensor's raw bytes straight from another file; returns its hash."""
        e = source.entries[source_name or name]
        self._next(name, e.dtype, e.shape)
        digest = source.sha256(source_name or name, out=self._fh)
        self._record(name, e.dtype, e.shape, e.end - e.start)
        return digest

    def _record(self, name: str, dtype: str, shape: tuple[int, ...], n: int) -> None:
        self._written[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def close(self) -> None:
        if len(self._written) != len(self._plan):
            self._fh.close()
            raise RuntimeError(f"StreamWriter: {len(self._plan) - len(self._written)} planned tensors were not written")
        header = self._header_bytes(self._written)
        header = header + b" " * (self._reserved - len(header))
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", len(header)) + header)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


def _padded_len(n: int) -> int:
    return n + (-n) % 8


# -- lossless packing of the int64 sums ------------------------------------------------------------


def packed_width(t: torch.Tensor) -> int:
    """Fewest little-endian bytes (1..8) whose two's complement holds every value of t."""
    if t.numel() == 0:
        return 1
    lo, hi = int(t.min()), int(t.max())
    for k in range(1, 8):
        if -(1 << (8 * k - 1)) <= lo and hi < (1 << (8 * k - 1)):
            return k
    return 8


def pack_int64(t: torch.Tensor) -> torch.Tensor:
    """An int64 tensor as uint8 [numel, k]: its k low bytes, k = packed_width(t)."""
    flat = t.detach().reshape(-1).contiguous()
    k = packed_width(flat)
    return flat.view(torch.uint8).reshape(-1, 8)[:, :k].contiguous()


def unpack_int64(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_int64: sign-extends the k stored bytes back to int64."""
    n, k = packed.shape
    full = torch.empty((n, 8), dtype=torch.uint8)
    full[:, :k] = packed
    if k < 8:
        negative = packed[:, k - 1] >= 128
        full[:, k:] = (negative.to(torch.uint8) * 255).unsqueeze(1)
    return full.reshape(-1).view(torch.int64).reshape(shape)


_BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, eight entries per byte (first entry in the lowest bit)."""
    flat = mask.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT.to(flat.device)).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack_bits for a mask of `shape`."""
    n = 1
    for d in shape:
        n *= d
    bits = (packed.to(torch.int32).unsqueeze(1) & _BIT.to(packed.device)).ne(0).reshape(-1)
    if bits.numel() < n:
        raise ValueError(f"packed mask holds {bits.numel()} bits, {n} needed")
    return bits[:n].reshape(shape)
