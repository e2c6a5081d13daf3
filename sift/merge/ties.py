"""TIES merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean.

For every weight W touched by the adapters, with d_i the dense delta of adapter i:

    t_i  = d_i kept at its top-k magnitudes (k = floor(density * numel)), zero elsewhere   (trim)
    s    = sign( sum_i t_i )        (a zero sum counts as +, as in peft)                   (elect)
    m_i  = 1{ sign(t_i) == s }      (a trimmed-away zero never agrees)
    W    = W0 + scale * ( sum_i m_i t_i ) / max(1, sum_i m_i)                               (disjoint mean)

This is peft's `ties(..., weights=1, majority_sign_method="total")` (peft.utils.merge_utils),
which the tests check it against. The sign election depends on every adapter, so TIES is not a
sum of per-adapter contributions: after a forget it is recomputed from all remaining stored
adapters (exact, not incremental; the certificate says "recomputed").

Exact and order-free by construction: the d_i are the adapters' fixed-point integer deltas (the
same int64 grid the linear merge uses, see sift.adapters.fixed_point_delta), so the trim ranks
integers (ties in magnitude broken by the lower flat index, not by whatever `topk` returns), the
elected sign and the agreeing sums are exact integer sums, and the one float step is a fixed
elementwise function. The adapters' order cannot change a byte.
"""

from __future__ import annotations

import torch

from sift.adapters import Adapter, fixed_point_delta
from sift.errors import SiftError
from sift.merge.base import Param, RecomputedMethod
from sift.merge.state import round_to

DEFAULT_BITS = 40


def trim_top_k(q: torch.Tensor, density: float) -> torch.Tensor:
    """q with all but its k = floor(density * numel) largest magnitudes set to zero; among equal
    magnitudes at the cut the lower flat indices are kept (deterministic, unlike topk)."""
    flat = q.reshape(-1)
    n = flat.numel()
    k = int(density * n)
    if k >= n:
        return q.clone()
    if k <= 0:
        return torch.zeros_like(q)
    mag = flat.abs()
    cut = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag > cut
    short = k - int(keep.sum())
    if short > 0:
        keep[torch.nonzero(mag == cut).reshape(-1)[:short]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(q.shape)


def ties_integer(trimmed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the agreeing entries, how many agree) over dim 0 of stacked int64 trimmed deltas."""
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1, -1)
    agree = trimmed.sign() == elected
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    return total, agree.sum(dim=0)


class TiesMethod(RecomputedMethod):
    name = "ties"
    summary = "TIES: trim each delta to its top-density magnitudes, elect a sign per weight, average the agreeing entries, times scale (recomputed after every forget)"
    params = (
        Param(
            "density",
            0.2,
            "fraction of each adapter's delta entries kept (by magnitude), per weight matrix",
            low=0.0,
            high=1.0,
        ),
        Param("scale", 1.0, "lambda: served = base + scale * disjoint mean"),
    )

    def merge_weight(
        self, adapters: list[Adapter], name: str, w0: torch.Tensor, params: dict[str, float], bits: int = DEFAULT_BITS
    ) -> torch.Tensor:
        density, scale = params["density"], params["scale"]
        trimmed = []
        for a in sorted(adapters, key=lambda a: a.shard):  # integer sums make order moot; sorted anyway
            if name in a.modules:
                q = fixed_point_delta(a.modules[name], a.scaling, bits)
                if q.shape != w0.shape:
                    raise SiftError(
                        f"adapter of shard {a.shard}: {name} has shape {tuple(q.shape)}, the base weight {tuple(w0.shape)}"
                    )
                trimmed.append(trim_top_k(q, density))
        total, count = ties_integer(torch.stack(trimmed))
        mean = total.to(torch.float64) / count.clamp(min=1).to(torch.float64)
        return round_to(w0.to(torch.float64) + mean * (scale * 2.0 ** (-bits)), w0.dtype)


TIES = TiesMethod()
