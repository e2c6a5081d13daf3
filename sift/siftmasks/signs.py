"""The shared sign vector v and one-bit masks, packed eight to a byte.

v is drawn per weight from (sign_seed, weight name) alone: it depends on no data and on no other
weight, so adding or removing a target module leaves the others' signs unchanged.
"""

from __future__ import annotations

import torch

from sift.determinism import derive_seed
from sift.tensorio import pack_bits, unpack_bits  # noqa: F401 - re-exported: they lived here


def positive_signs(name: str, shape: torch.Size | tuple[int, ...], sign_seed: int) -> torch.Tensor:
    """v > 0 as a bool tensor (True: v = +1, False: v = -1), uniform and independent per entry."""
    gen = torch.Generator().manual_seed(derive_seed("sift-masks-signs", sign_seed, name))
    return torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.uint8).bool()


def disagrees(tau: torch.Tensor, v_pos: torch.Tensor) -> torch.Tensor:
    """Where tau * v < 0 (tau has the sign v forbids)."""
    return torch.where(v_pos.to(tau.device), tau < 0, tau > 0)
