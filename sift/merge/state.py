"""The sufficient statistic of a linear merge: one int64 sum of fixed-point deltas per weight.

Integer addition is exact, so removing an adapter (subtract its q) and adding its retrained
successor gives the same integers as summing the surviving adapters from scratch, in any order;
the served weights are then a fixed elementwise function of (base, sum, coefficient):

    W = fp32( fp64(W0) + fp64(sum) * (coefficient * 2**-bits) )
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sift.adapters import Adapter, fixed_point_delta
from sift.errors import SiftError

STATE_DIR = "sift-merge"
_ACC = "accumulator.safetensors"
_META = "state.json"


@dataclass
class MergeState:
    bits: int
    base_fingerprint: str
    members: dict[int, str] = field(default_factory=dict)  # shard -> adapter sha256
    acc: dict[str, torch.Tensor] = field(default_factory=dict)  # base weight name -> int64 sum

    def _apply(self, adapter: Adapter, sign: int) -> None:
        for name, factors in adapter.modules.items():
            q = fixed_point_delta(factors, adapter.scaling, self.bits)
            if name in self.acc:
                if self.acc[name].shape != q.shape:
                    raise SiftError(f"adapter of shard {adapter.shard}: {name} has shape {tuple(q.shape)}, expected {tuple(self.acc[name].shape)}")
                self.acc[name].add_(q, alpha=sign)
            else:
                self.acc[name] = q if sign > 0 else -q

    def add(self, adapter: Adapter) -> None:
        if adapter.shard in self.members:
            raise SiftError(f"shard {adapter.shard} is already in the merge")
        self._apply(adapter, +1)
        self.members[adapter.shard] = adapter.sha256

    def subtract(self, adapter: Adapter) -> None:
        if self.members.get(adapter.shard) != adapter.sha256:
            raise SiftError(f"shard {adapter.shard}'s adapter is not the one in the merge")
        self._apply(adapter, -1)
        del self.members[adapter.shard]
        if not self.members:
            self.acc = {}  # nothing left: the same state a fresh, empty merge has

    def served_weights(self, base_state: dict[str, torch.Tensor], coefficient: float,
                       masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The merged values of every weight the adapters touch; with `masks` (SIFT-Masks' local
        mask of one shard) only the masked entries of the sum are applied, the rest stay at base."""
        factor = coefficient * 2.0 ** (-self.bits)
        out = {}
        for name, total in self.acc.items():
            if masks is not None:
                keep = masks.get(name)
                total = torch.zeros_like(total) if keep is None else torch.where(keep, total, torch.zeros_like(total))
            if name not in base_state:
                raise SiftError(f"the base model has no weight {name}: adapters and base do not match")
            w0 = base_state[name]
            if w0.shape != total.shape:  # e.g. a [out, in] delta for a Conv1D weight stored [in, out]
                raise SiftError(f"the adapters' delta for {name} has shape {tuple(total.shape)} but the base weight has {tuple(w0.shape)}: adapters and base do not match")
            out[name] = (w0.to(torch.float64) + total.to(torch.float64) * factor).to(w0.dtype)
        return out

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sorted(self.acc.items())}, str(folder / _ACC))
        meta = {
            "bits": self.bits,
            "base_fingerprint": self.base_fingerprint,
            "members": {str(k): v for k, v in sorted(self.members.items())},
        }
        (folder / _META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @staticmethod
    def load(folder: Path) -> MergeState | None:
        """The saved state, or None when there is none or it cannot be trusted (then the caller
        merges from scratch, which is always correct)."""
        try:
            meta: dict[str, Any] = json.loads((folder / _META).read_text())
            acc = load_file(str(folder / _ACC))
        except Exception:
            return None
        if any(t.dtype != torch.int64 for t in acc.values()):
            return None
        return MergeState(
            bits=int(meta["bits"]),
            base_fingerprint=meta["base_fingerprint"],
            members={int(k): v for k, v in meta["members"].items()},
            acc=dict(acc),
        )
