"""A SIFT-Masks shard on disk: its local mask and its delta, in one safetensors file.

For every tuned weight `W` the file holds
    W.mask   uint8: m_c = 1{tau_c * v > 0}, packed eight to a byte (what routed serving reads)
    W.values float32: tau_c at the mask's entries, in flat order (what merge and forget read)
    W.shape  int64: the weight's shape
Sign-fixed tuning keeps tau_c * v >= 0, so tau_c is zero exactly where the mask is: storing only
the masked values is lossless and costs 1 bit per weight plus 4 bytes per moved weight.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from sift.adapters import DELTA_FILE, delta_weight_names, load_dense_adapter  # noqa: F401 - re-exported: they lived here
from sift.errors import SiftError
from sift.fsio import atomic_write_bytes
from sift.hashing import tensors_sha256
from sift.tensorio import pack_bits, unpack_bits


def encode(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tau in sorted(deltas.items()):
        nonzero = tau != 0
        out[f"{name}.mask"] = pack_bits(nonzero)
        out[f"{name}.values"] = tau.reshape(-1)[nonzero.reshape(-1)].to(torch.float32).contiguous()
        out[f"{name}.shape"] = torch.tensor(list(tau.shape), dtype=torch.int64)
    return out


def save_delta(path: Path, deltas: dict[str, torch.Tensor]) -> str:
    """Write the file; returns the sha256 of its tensors (the shard's identity in the merge)."""
    tensors = encode(deltas)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"format": "sift-masks"}))
    return tensors_sha256(tensors)[0]


def load_masks(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Each tuned weight's local mask (bool, the weight's shape), reading neither value arrays."""
    path = adapter_dir / DELTA_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            out = {}
            for name in delta_weight_names(keys):
                shape = tuple(int(x) for x in f.get_tensor(f"{name}.shape").tolist())
                out[name] = unpack_bits(f.get_tensor(f"{name}.mask"), shape)
            return out
    except Exception as exc:
        raise SiftError(f"SIFT-Masks shard {adapter_dir} cannot be read: {exc}") from None
