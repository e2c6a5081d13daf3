"""Sharpness-aware unlearning: smooth the forget objective against the weight change that a
relearning attack would make.

Fan et al., "Towards LLM Unlearning Resilient to Relearning Attacks: A Sharpness-Aware
Minimization Perspective and Beyond" (arXiv 2502.05374) observe that relearning on a few forget
samples moves the weights in the direction that raises the forget objective, and pose robust
unlearning as a min-max problem, adversarial training in weight space:

    min_theta  max_{||delta||_2 <= rho}  l_f(theta + delta)  +  gamma * l_r(theta)

Only the forget term is smoothed; the retain term is taken at the unperturbed weights. SAM's
first-order solution of the inner max is delta* = rho * grad l_f(theta) / ||grad l_f(theta)||_2 (one
global L2 norm over every trainable tensor), so one step is: the forget gradient at theta, move to
theta + delta*, the forget gradient there, move back, add the retain gradient at theta, and let
the optimizer step with the sum. Three backward passes per step instead of two. The authors'
scripts use rho = 0.01.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SAM_EPS = 1e-12  # keeps delta finite when the forget gradient vanishes


def sam_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """delta = rho * g / ||g||_2, the norm taken over all tensors together."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))  # type: ignore[arg-type]
    scale = rho / (float(norm) + SAM_EPS)
    return [g * scale for g in grads]


def sam_forget_backward(params: list[torch.nn.Parameter], forget_loss: Callable[[], torch.Tensor], rho: float) -> float:
    """Leave in each p.grad the forget gradient at theta + delta* (added to whatever p.grad held);
    returns the forget loss at theta. The weights are back at theta when it returns."""
    loss = forget_loss()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
    delta = sam_perturbation(grads, rho)
    saved = [p.detach().clone() for p in params]  # restored by copy: theta + delta - delta is not theta in floats
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d)
    try:
        forget_loss().backward()
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                p.copy_(p0)
    return float(loss.detach())
