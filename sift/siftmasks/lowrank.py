"""sift's LoRA form of SIFT-Masks (not the paper's): sign-fixed training of B in W0 + s * B @ A.

For every tuned weight W ([rows, cols]) one matrix A ([r, cols]) is drawn from the sign seed and
the weight's name alone, frozen, and shared by every shard. A shard trains only B ([rows, r],
starting at zero, scale s = lora.alpha / lora.r) and after every optimizer step sets back to zero
the entries of B whose sign disagrees with B's own seeded sign vector, so B_c * v_B >= 0. The
local mask m_c = 1{B_c != 0} lives on B. Because A is shared, the merged model is a function of
the sum of the B's:

    served (no task id)   W = W0 + s * (sum_c B_c / T) @ A        (sift-masks-lora)
    routed to shard c     W = W0 + s * (m_c * sum_c B_c / T) @ A
    per-coordinate        the same with sum / count in place of sum / T (sift-masks-lora-coordinate)

The sums of B (and counts of nonzero entries) are integer sums like those of the dense form, so
forgets stay exact and incremental; a shard stores r x rows values instead of cols x rows.
The product with A is written as a fixed-order sum of exact float64 outer products (no BLAS,
whose blocking varies with threads), like the LoRA merge's, so every path gives the same bytes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.nn.utils import parametrize

from sift.config import SiftConfig
from sift.determinism import derive_seed
from sift.errors import SiftError
from sift.loop import Example, LoopResult
from sift.models import target_weights
from sift.siftmasks.signs import disagrees, positive_signs
from sift.siftmasks.tune import keep_largest, run_projected


def frozen_a(name: str, rank: int, cols: int, seed: int) -> torch.Tensor:
    """A of weight `name`: float32 [rank, cols], uniform in +-1/sqrt(cols) (the bound of peft's
    default Kaiming init of A), from (seed, name) alone: the same for every shard and every run."""
    gen = torch.Generator().manual_seed(derive_seed("sift-masks-lora-a", seed, name))
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand((rank, cols), generator=gen, dtype=torch.float32) * 2 - 1) * bound


def b_signs(name: str, rows: int, rank: int, seed: int) -> torch.Tensor:
    """v_B > 0 of weight `name` (bool [rows, rank]), from (seed, name) alone."""
    return positive_signs(f"{name}#lora_B", (rows, rank), seed)


def lowrank_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """b @ a in float64 as a fixed-order sum of outer products (elementwise ops only)."""
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    out = torch.zeros(b64.shape[0], a64.shape[1], dtype=torch.float64)
    for k in range(a64.shape[0]):
        out.addcmul_(b64[:, k : k + 1], a64[k : k + 1, :])
    return out


def lora_scale(cfg: SiftConfig) -> float:
    return cfg.lora.alpha / cfg.lora.r


class _PlusLowRank(torch.nn.Module):
    """The weight the forward pass sees: W0 + s * B @ A (in float32, then the base's dtype)."""

    def __init__(self, a: torch.Tensor, b: torch.nn.Parameter, scale: float):
        super().__init__()
        self.register_buffer("a", a, persistent=False)
        self.b, self.scale = b, scale

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return (w0.to(torch.float32) + self.scale * (self.b @ self.a)).to(w0.dtype)


@contextlib.contextmanager
def low_rank_weights(model: Any, cfg: SiftConfig) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Each target weight as W0 + s * B @ A through torch's parametrizations, B by weight name
    (zeros, float32, trainable); on the way out the parametrizations are removed and the base's
    own Parameter objects put back, never written."""
    weights = target_weights(model, cfg.sift_masks.target_modules)
    modules = dict(model.named_modules())
    rank, scale, seed = cfg.lora.r, lora_scale(cfg), cfg.sift_masks.sign_seed
    swapped: dict[str, tuple[Any, torch.nn.Parameter]] = {}
    try:
        out: dict[str, torch.nn.Parameter] = {}
        for name, w in weights.items():
            rows, cols = w.shape
            a = frozen_a(name, rank, cols, seed).to(w.device)
            b = torch.nn.Parameter(torch.zeros(rows, rank, dtype=torch.float32, device=w.device))
            module = modules[name.rsplit(".", 1)[0]]
            swapped[name] = (module, w)
            parametrize.register_parametrization(module, "weight", _PlusLowRank(a, b, scale), unsafe=True)
            out[name] = b
        yield out
    finally:
        for module, own in swapped.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight = own


def tune_sign_fixed_lowrank(
    model: Any,
    examples: Sequence[Example],
    pad_id: int,
    cfg: SiftConfig,
    seed: int,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], LoopResult]:
    """Train each target weight's B (A frozen) with B * v_B >= 0 kept after every step; returns
    each weight's B (float32 [rows, r], density applied) and the loop's result. The base's
    weights are never written."""
    for p in model.parameters():
        p.requires_grad_(False)
    with low_rank_weights(model, cfg) as bs:
        v_pos = {name: b_signs(name, *b.shape, cfg.sift_masks.sign_seed).to(b.device) for name, b in bs.items()}

        def project(_step: int) -> None:
            with torch.no_grad():
                for name, b in bs.items():
                    b.masked_fill_(disagrees(b, v_pos[name]), 0.0)

        result = run_projected(model, bs, project, examples, pad_id, cfg, seed, loss_fn, progress)
        out = {name: b.detach().to("cpu", torch.float32).contiguous() for name, b in bs.items()}
    if cfg.sift_masks.density < 1.0:
        out = {name: keep_largest(b, cfg.sift_masks.density) for name, b in out.items()}
    for name, b in out.items():  # the invariant the masks rest on
        if bool(disagrees(b, v_pos[name].cpu()).any()):  # pragma: no cover - the projection forbids it
            raise SiftError(f"sign-fixed tuning broke B * v_B >= 0 on {name}")
    return out, result
