"""A LoRA adapter as a value: its factors, its identity hash, and its exact dense delta.

The delta of module m is  scaling * B @ A.  Merging needs it bit-for-bit reproducible and
order-free, so it is turned into fixed-point integers:

    q = round( sum_k B[:, k] * A[k, :]  * scaling * 2**bits )      (int64)

The products of two fp32 numbers are exact in float64, they are summed over k in a fixed order
with elementwise ops (no BLAS, whose blocking and kernels vary with threads and alignment), and
rounding to a grid makes every later sum of adapters an exact integer sum: associative,
commutative, and subtractable. So `acc - q_old + q_new` equals a fresh sum, byte for byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from sift.errors import SiftError
from sift.hashing import tensors_sha256

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
META = "sift-meta.json"
_PREFIX = "base_model.model."


@dataclass
class LoraFactors:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]


@dataclass
class Adapter:
    shard: int
    sha256: str  # hash of the adapter's tensors: the identity the merge state records
    scaling: float
    modules: dict[str, LoraFactors]  # keyed by the base weight's name, e.g. model.layers.0.mlp.up_proj.weight


def read_meta(adapter_dir: Path) -> dict | None:
    try:
        return json.loads((adapter_dir / META).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def adapter_is_current(adapter_dir: Path, content_hash: str) -> bool:
    """True when the folder holds an adapter trained on exactly the content `content_hash` names."""
    meta = read_meta(adapter_dir)
    return meta is not None and meta.get("content_hash") == content_hash and (adapter_dir / ADAPTER_WEIGHTS).exists()


def load_adapter(adapter_dir: Path, shard: int) -> Adapter:
    """Load a PEFT LoRA adapter folder (safetensors only) and check it against its recorded hash."""
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.exists():
        raise SiftError(f"adapter {adapter_dir} has no {ADAPTER_WEIGHTS} (safetensors is the only accepted format)")
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        tensors = load_file(str(weights))
    except Exception as exc:  # a truncated or foreign file: one clear line
        raise SiftError(f"adapter {adapter_dir} cannot be read: {exc}") from None
    if cfg.get("peft_type") != "LORA":
        raise SiftError(f"adapter {adapter_dir} is not a LoRA adapter")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise SiftError(f"adapter {adapter_dir}: per-module rank or alpha patterns are not supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    digest = tensors_sha256(tensors)[0]
    meta = read_meta(adapter_dir)
    if meta is not None and meta.get("adapter_sha256") not in (None, digest):
        raise SiftError(f"adapter {adapter_dir} does not match its recorded hash: damaged or replaced")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(_PREFIX):
            raise SiftError(f"adapter {adapter_dir}: unexpected tensor {key}")
        body = key[len(_PREFIX):]
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if body.endswith(suffix):
                modules.setdefault(body[: -len(suffix)] + ".weight", {})[part] = value
                break
        else:
            raise SiftError(f"adapter {adapter_dir}: unsupported tensor {key} (only LoRA A/B weights)")
    factors = {}
    for name, parts in sorted(modules.items()):
        if set(parts) != {"lora_A", "lora_B"}:
            raise SiftError(f"adapter {adapter_dir}: module {name} lacks its A or B matrix")
        factors[name] = LoraFactors(parts["lora_A"].to(torch.float32), parts["lora_B"].to(torch.float32))
    return Adapter(shard=shard, sha256=digest, scaling=scaling, modules=factors)


def fixed_point_delta(f: LoraFactors, scaling: float, bits: int) -> torch.Tensor:
    """scaling * B @ A on the integer grid 2**-bits, computed identically on every call."""
    a = f.a.to(torch.float64)
    b = f.b.to(torch.float64)
    acc = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64)
    for k in range(a.shape[0]):  # fixed order; each product is exact in float64
        acc.addcmul_(b[:, k : k + 1], a[k : k + 1, :])
    acc.mul_(scaling * 2.0**bits).round_()
    limit = 2.0**53  # keeps each term exact as float64 and a sum of 1024 adapters inside int64
    peak = acc.abs().max().item() if acc.numel() else 0.0
    if not math.isfinite(peak) or peak >= limit:
        raise SiftError(f"an adapter delta is too large for the merge accumulator (|delta| = {peak / 2.0**bits:.3g}); lower merge.fixed_point_bits")
    return acc.to(torch.int64)
