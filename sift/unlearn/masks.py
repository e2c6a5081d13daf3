"""Which weights an unlearning method may move: WAGLE's weight attribution and its controls.

WAGLE (Jia et al., "WAGLE: Strategic Weight Attribution for Effective and Modular Unlearning in
Large Language Models", NeurIPS 2024) poses weight selection as a bi-level problem: how much does
removing a weight change the forget objective once the retain loss is re-optimised? Its
implicit-gradient answer, with the lower level's Hessian taken as a scalar diagonal gamma*I, is a
closed-form score per weight

    S_i = | (theta_i - g_r,i / gamma) * g_f,i |

with g_f and g_r the gradients of the forget and retain NLL summed over one pass of the
unlearning data, gamma = 1e-6 (the value in every configuration the authors released). The
scores of all eligible weights are ranked together (one global ranking, no per-layer quota) and
the top `ratio` fraction is unlearned; every other weight keeps its value (its gradient is
zeroed after clipping, before the optimizer step, as the authors' code does; sift's unlearning
uses no weight decay, so a masked weight does not move at all).

Eligible weights here are the LoRA factors `sift unlearn` tunes (the paper ranks every weight of
a fully fine-tuned model). The paper's controls are kept: `magnitude` (|theta|, global top
ratio) and `random` (a seeded uniform score).
"""

from __future__ import annotations

import torch

from sift.unlearn.settings import MASKS, WAGLE_GAMMA

__all__ = [
    "MASKS",
    "WAGLE_GAMMA",
    "apply_masks",
    "magnitude_scores",
    "mask_fraction",
    "random_scores",
    "top_fraction",
    "wagle_scores",
]


def wagle_scores(
    params: list[torch.Tensor], g_forget: list[torch.Tensor], g_retain: list[torch.Tensor], gamma: float = WAGLE_GAMMA
) -> list[torch.Tensor]:
    """|(theta - g_r / gamma) * g_f| per weight, in float64 (the ranking must not depend on rounding)."""
    return [
        ((p.detach().double() - gr.double() / gamma) * gf.double()).abs()
        for p, gf, gr in zip(params, g_forget, g_retain)
    ]


def magnitude_scores(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().double().abs() for p in params]


def random_scores(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(p.shape, generator=gen, dtype=torch.float64).to(p.device) for p in params]


def top_fraction(scores: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Boolean masks holding exactly round(ratio * n) of the n weights, those with the largest
    scores over all tensors together; ties broken by position (a stable sort), so the mask is
    the same on every run."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in (0, 1], got {ratio}")
    flat = torch.cat([s.reshape(-1) for s in scores])
    keep = int(round(ratio * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        chosen[order[:keep]] = True
    out, start = [], 0
    for s in scores:
        out.append(chosen[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def apply_masks(params: list[torch.nn.Parameter], masks: list[torch.Tensor]) -> None:
    """Zero the gradient of every weight outside its mask (call after clipping, before the step)."""
    for p, m in zip(params, masks):
        if p.grad is not None:
            p.grad.mul_(m.to(device=p.grad.device, dtype=p.grad.dtype))


def mask_fraction(masks: list[torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks)
    return sum(int(m.sum()) for m in masks) / max(1, total)
