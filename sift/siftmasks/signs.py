"""The shared sign vector v and one-bit masks, packed eight to a byte.

v is drawn per weight from (sign_seed, weight name) alone: it depends on no data and on no other
weight, so adding or removing a target module leaves the others' signs unchanged.
"""

from __future__ import annotations

import torch

from sift.determinism import derive_seed

_BIT = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def positive_signs(name: str, shape: torch.Size | tuple[int, ...], sign_seed: int) -> torch.Tensor:
    """v > 0 as a bool tensor (True: v = +1, False: v = -1), uniform and independent per entry."""
    gen = torch.Generator().manual_seed(derive_seed("sift-masks-signs", sign_seed, name))
    return torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.uint8).bool()


def disagrees(tau: torch.Tensor, v_pos: torch.Tensor) -> torch.Tensor:
    """Where tau * v < 0 (tau has the sign v forbids)."""
    return torch.where(v_pos, tau < 0, tau > 0)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, eight entries per byte (first entry in the lowest bit)."""
    flat = mask.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of pack_bits for a mask of `shape`."""
    n = 1
    for d in shape:
        n *= d
    bits = (packed.to(torch.int32).unsqueeze(1) & _BIT).ne(0).reshape(-1)
    if bits.numel() < n:
        raise ValueError(f"packed mask holds {bits.numel()} bits, {n} needed")
    return bits[:n].reshape(shape)
