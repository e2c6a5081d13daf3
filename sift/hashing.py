"""Stable hashes: shard assignment, content hashes of rows and tensors.

Never Python's `hash()` (salted per process). Tensor hashes cover name, dtype, shape and raw bytes,
so two files with the same tensors hash the same whatever their serialisation.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # torch loads when a tensor is hashed: a command that refuses its input starts fast
    import torch


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


T = TypeVar("T")


def hash_order(items: Iterable[T], key: Callable[[T], str], salt: str = "") -> list[T]:
    """`items` ordered by sha256(salt + key(item)): a seeded, reproducible shuffle that depends on
    the keys alone, not on the order they come in (take a prefix for a random subset)."""
    return sorted(items, key=lambda item: sha256_hex((salt + key(item)).encode()))


def shard_of(key: str, num_shards: int) -> int:
    """shard = blake2b(key as UTF-8) mod S: depends on this key alone, on any machine."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def keyed_id_hash(salt: bytes, row_id: str) -> str:
    """What the ledger keeps of a forgotten id: a keyed hash, so small ids are not brute-forced."""
    return hmac.new(salt, row_id.encode("utf-8"), hashlib.sha256).hexdigest()


def keyed_group_hash(salt: bytes, normalised_group: str) -> str:
    """What the ledger keeps of a person forgotten by `forget --group`: a keyed hash of the
    normalised group value, in a namespace apart from the ids'."""
    return hmac.new(salt, b"group\0" + normalised_group.encode("utf-8"), hashlib.sha256).hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, str]]:
    """(overall hash, per-tensor hashes), in sorted name order."""
    per = {name: tensor_sha256(tensors[name]) for name in sorted(tensors)}
    return combine_hashes(per.items()), per


def combine_hashes(items: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, digest in items:
        h.update(name.encode("utf-8") + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()
