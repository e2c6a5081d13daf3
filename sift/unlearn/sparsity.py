"""Sparsity-aided unlearning: prune first, and the l1-sparse unlearning objective.

Jia et al., "Model Sparsity Can Simplify Machine Unlearning" (NeurIPS 2023) show that the gap
between an approximate unlearner and retraining shrinks as the model gets sparser, and give two
recipes:

- **prune first, then unlearn**: one-shot global magnitude pruning (the paper's main setting
  prunes 95 % of the weights), then any unlearning method on the sparse model with the pruning
  mask kept (pruned weights stay zero). Here the pruned weights are the LoRA factors that hold
  the fine-tuned delta; `--prune RATIO` zeroes the RATIO smallest of them by magnitude and keeps
  them at zero while unlearning.
- **l1-sparse unlearning**: fine-tune on the retain set with an l1 penalty,
      theta_u = argmin_theta  L_FT(theta; D_r) + gamma_e * ||theta||_1,
  gamma decaying linearly over the epochs, gamma_e = gamma * (1 - (e - 1) / E) for epoch e of E
  (the authors' code; the penalty is the raw sum of |theta|). Here over the trainable LoRA
  factors; `--method l1sparse` with `--l1 GAMMA` (the paper's gamma was not found in its text or
  code; sift's default 1e-4 is untuned).
"""

from __future__ import annotations

import torch

from sift.unlearn.masks import top_fraction
from sift.unlearn.methods import L1_DEFAULT

__all__ = ["L1_DEFAULT", "l1_penalty", "l1_weight", "prune_by_magnitude"]


def l1_weight(gamma: float, epoch: int, epochs: int) -> float:
    """gamma_e = gamma * (1 - (e - 1) / E) for the 1-based epoch e: gamma first, gamma / E last."""
    return gamma * (1.0 - (epoch - 1) / epochs)


def l1_penalty(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return sum(p.abs().sum() for p in params)  # type: ignore[return-value]


def prune_by_magnitude(params: list[torch.nn.Parameter], ratio: float) -> list[torch.Tensor]:
    """Zero the `ratio` fraction of smallest |theta| over all tensors together; returns the masks
    of the weights that survive (to keep the pruned ones at zero while unlearning)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must lie in [0, 1), got {ratio}")
    keep = top_fraction([p.detach().double().abs() for p in params], 1.0 - ratio)
    with torch.no_grad():
        for p, m in zip(params, keep):
            p.mul_(m.to(p.dtype))
    return keep
