"""The sufficient statistic of a linear merge: one int64 sum of fixed-point deltas per weight.

Integer addition is exact, so removing an adapter (subtract its q) and adding its retrained
successor gives the same integers as summing the surviving adapters from scratch, in any order;
the served weights are then a fixed elementwise function of (base, sum, coefficient):

    W = fp32( fp64(W0) + fp64(sum) * (coefficient * 2**-bits) )

A per-coordinate method (sift-masks-coordinate) keeps a second integer sum per weight, the count
of adapters whose delta is nonzero at each entry (`counts`), and serves

    W = fp32( fp64(W0) + fp64(sum) * 2**-bits / max(count, 1) )

Counts are sums of per-adapter 0/1 tensors: exact and subtractable like the sums themselves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sift.adapters import Adapter, check_sum_headroom, fixed_point_delta
from sift.errors import SiftError
from sift.hashing import combine_hashes, tensor_sha256
from sift.tensorio import StreamWriter, TensorFile, pack_int64, unpack_int64

STATE_DIR = "sift-merge"
_ACC = "accumulator.safetensors"
_META = "state.json"
PACKED = "packed-le-v1"  # sift.tensorio.pack_int64, shapes in state.json


COUNT_SUFFIX = ":count"  # a weight's count entry in the saved sums: "<weight name>:count"


def count_name(name: str) -> str:
    return name + COUNT_SUFFIX


def is_count(name: str) -> bool:
    return name.endswith(COUNT_SUFFIX)


def support_count(f: Any) -> torch.Tensor:
    """An adapter's contribution to a weight's count: 1 where its delta is nonzero (a SIFT-Masks
    shard's local mask, since sign-fixed tuning leaves tau_c zero exactly off the mask)."""
    delta = getattr(f, "delta", None)
    if delta is None:
        raise SiftError("a per-coordinate merge counts dense deltas (train.method sift-masks), not LoRA factors")
    return (delta != 0).to(torch.int64)


def served_value_per_coordinate(w0: torch.Tensor, total: torch.Tensor, count: torch.Tensor, bits: int) -> torch.Tensor:
    """fp64(W0) + fp64(sum) * 2**-bits / max(count, 1), rounded to W0's dtype: the mean over the
    adapters that moved each entry (an entry no adapter moved has sum 0 and stays W0)."""
    mean = total.to(torch.float64).mul(2.0 ** (-bits)).div_(count.clamp(min=1).to(torch.float64))
    return round_to(w0.to(torch.float64) + mean, w0.dtype)


def served_value(w0: torch.Tensor, total: torch.Tensor, coefficient: float, bits: int) -> torch.Tensor:
    """The one formula every merge path serves: fp64(W0) + fp64(sum) * (c * 2**-bits), rounded
    to W0's dtype."""
    return round_to(w0.to(torch.float64) + total.to(torch.float64) * (coefficient * 2.0 ** (-bits)), w0.dtype)


def round_to(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 to fp32 (round to nearest even), then to a half-precision dtype, written out as two
    steps: torch 2.13 on the CPU already rounds fp64 to bf16 through fp32 (1 + 2**-8 + 2**-30
    gives 1.0, where a direct rounding gives 1.0078125), and this keeps it so whatever a later
    torch does. fp32 bases take the first step only, as they always did."""
    return value.to(torch.float32).to(dtype)


@dataclass
class MergeState:
    bits: int
    base_fingerprint: str
    members: dict[int, str] = field(default_factory=dict)  # shard -> adapter sha256
    acc: dict[str, torch.Tensor] = field(default_factory=dict)  # base weight name -> int64 sum
    counts: bool = False  # also keep each weight's per-entry count of nonzero deltas (count_name)

    def _apply(self, adapter: Adapter, sign: int) -> None:
        for name, factors in adapter.modules.items():
            terms = [(name, fixed_point_delta(factors, adapter.scaling, self.bits))]
            if self.counts:
                terms.append((count_name(name), support_count(factors)))
            for key, q in terms:
                if key in self.acc:
                    if self.acc[key].shape != q.shape:
                        raise SiftError(
                            f"adapter of shard {adapter.shard}: {name} has shape {tuple(q.shape)}, expected {tuple(self.acc[key].shape)}"
                        )
                    self.acc[key].add_(q, alpha=sign)
                else:
                    self.acc[key] = q if sign > 0 else -q

    def weight_names(self) -> list[str]:
        return [name for name in self.acc if not is_count(name)]

    def add(self, adapter: Adapter) -> None:
        if adapter.shard in self.members:
            raise SiftError(f"shard {adapter.shard} is already in the merge")
        check_sum_headroom(len(self.members) + 1)
        self._apply(adapter, +1)
        self.members[adapter.shard] = adapter.sha256

    def subtract(self, adapter: Adapter) -> None:
        if self.members.get(adapter.shard) != adapter.sha256:
            raise SiftError(f"shard {adapter.shard}'s adapter is not the one in the merge")
        self._apply(adapter, -1)
        del self.members[adapter.shard]
        if not self.members:
            self.acc = {}  # nothing left: the same state a fresh, empty merge has

    def served_weights(
        self, base_state: dict[str, torch.Tensor], coefficient: float, masks: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The merged values of every weight the adapters touch; with `masks` (SIFT-Masks' local
        mask of one shard) only the masked entries of the sum are applied, the rest stay at base.
        With counts, each entry is the sum over its count (the coefficient is not used)."""
        out = {}
        for name in self.weight_names():
            total = self.acc[name]
            if masks is not None:
                keep = masks.get(name)
                total = torch.zeros_like(total) if keep is None else torch.where(keep, total, torch.zeros_like(total))
            if name not in base_state:
                raise SiftError(f"the base model has no weight {name}: adapters and base do not match")
            w0 = base_state[name]
            if w0.shape != total.shape:  # e.g. a [out, in] delta for a Conv1D weight stored [in, out]
                raise SiftError(
                    f"the adapters' delta for {name} has shape {tuple(total.shape)} but the base weight has {tuple(w0.shape)}: adapters and base do not match"
                )
            if self.counts:
                out[name] = served_value_per_coordinate(w0, total, self.acc[count_name(name)], self.bits)
            else:
                out[name] = served_value(w0, total, coefficient, self.bits)
        return out

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """The sums packed losslessly (sift.tensorio), tensor by tensor, and state.json."""
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted(self.acc)
        with SumsWriter(folder, names, {n: tuple(self.acc[n].shape) for n in names}) as out:
            for name in names:
                out.write(name, self.acc[name])
            out.finish(self.bits, self.base_fingerprint, self.members, self.counts)

    @staticmethod
    def load(folder: Path) -> MergeState | None:
        """The saved state, all in memory, or None when there is none or it cannot be trusted (then
        the caller merges from scratch, which is always correct)."""
        reader = SumsReader.open(folder)
        if reader is None:
            return None
        with reader:
            try:
                acc = {name: reader.get(name) for name in reader.names()}
            except Exception:
                return None
        return MergeState(
            bits=reader.bits,
            base_fingerprint=reader.base_fingerprint,
            members=dict(reader.members),
            acc=acc,
            counts=reader.counts,
        )


class SumsReader:
    """Saved sums read one tensor at a time (int64), in either encoding: packed bytes (current)
    or plain int64 (workspaces written before packing)."""

    def __init__(self, folder: Path, meta: dict[str, Any], tensors: TensorFile):
        self.folder, self._file = folder, tensors
        self.bits = int(meta["bits"])
        self.base_fingerprint: str = meta["base_fingerprint"]
        self.members: dict[int, str] = {int(k): v for k, v in meta["members"].items()}
        self.counts = bool(meta.get("counts", False))  # per-entry counts beside the sums
        self._shapes: dict[str, list[int]] | None = meta.get("shapes") if meta.get("encoding") == PACKED else None
        self._stored_sha256: dict[str, str] = dict(meta.get("stored_sha256") or {})
        if meta.get("encoding", "int64") not in (PACKED, "int64"):
            raise SiftError(f"{folder}: unknown merge-state encoding {meta.get('encoding')!r}")

    @staticmethod
    def open(folder: Path) -> SumsReader | None:
        try:
            meta: dict[str, Any] = json.loads((folder / _META).read_text())
            reader = SumsReader(folder, meta, TensorFile(folder / _ACC))
        except Exception:
            return None
        want = "U8" if reader._shapes is not None else "I64"
        if any(e.dtype != want for e in reader._file.entries.values()) or (
            reader._shapes is not None and set(reader._shapes) != set(reader._file.entries)
        ):
            reader.close()
            return None
        return reader

    def names(self) -> list[str]:
        return sorted(self._file.entries)

    def intact(self) -> bool:
        """True when the file is whole: as long as its header says, and (sums written since the
        hashes were recorded) every stored tensor hashes to its record. One read of the file;
        a damaged sum is never taken for a whole one."""
        f = self._file
        size = f.path.stat().st_size
        if size != f.data_start + max((e.end for e in f.entries.values()), default=0):
            return False
        if self._stored_sha256:
            if set(self._stored_sha256) != set(f.entries):
                return False
            return all(f.sha256(n) == self._stored_sha256[n] for n in f.names())
        return True

    def get(self, name: str) -> torch.Tensor:
        t = self._file.get(name)
        return t if self._shapes is None else unpack_int64(t, tuple(self._shapes[name]))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SumsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SumsWriter:
    """Writes saved sums tensor by tensor in a fixed order of names (a streaming merge writes each
    as soon as it is computed); `finish` writes state.json last."""

    def __init__(self, folder: Path, names: list[str], shapes: dict[str, tuple[int, ...]]):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.shapes = folder, shapes
        plan = [(n, "U8", (math.prod(shapes[n]), 8)) for n in names]
        self._out = StreamWriter(folder / _ACC, plan, {"sift": "merge sums, packed int64"})
        self._stored: dict[str, str] = {}

    def write(self, name: str, total: torch.Tensor) -> None:
        if tuple(total.shape) != tuple(self.shapes[name]) or total.dtype != torch.int64:
            raise RuntimeError(f"SumsWriter: {name} is not the planned int64 tensor")
        self._stored[name] = self._out.write(name, pack_int64(total))

    def finish(self, bits: int, base_fingerprint: str, members: dict[int, str], counts: bool = False) -> None:
        self._out.close()
        meta = {
            **({"counts": True} if counts else {}),  # sums written before counts keep their bytes
            "bits": bits,
            "base_fingerprint": base_fingerprint,
            "members": {str(k): v for k, v in sorted(members.items())},
            "encoding": PACKED,
            "shapes": {n: list(s) for n, s in sorted(self.shapes.items())},
            "stored_sha256": dict(sorted(self._stored.items())),  # of each packed tensor, checked before use
        }
        (self.folder / _META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def __enter__(self) -> SumsWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self._out.abort()


def sums_sha256(folder: Path) -> str | None:
    """Hash of the saved sums as int64 values (the same whatever their encoding), one tensor at a
    time; None when there are none."""
    reader = SumsReader.open(folder)
    if reader is None:
        return None
    with reader:
        return combine_hashes((n, tensor_sha256(reader.get(n))) for n in reader.names())
