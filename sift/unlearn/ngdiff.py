"""NGDiff (Bu et al., NAACL 2025, arXiv 2410.22086): normalised gradient difference, with the
GeN automatic learning rate (Bu & Xu, ICLR 2025).

Direction:  g = g_R / (||g_R|| + eps) - g_F / (||g_F|| + eps),   update theta <- theta - eta * g
  g_R = grad of the retain NLL, g_F = grad of the forget NLL. The norms are global: one norm over
  every trainable tensor (here the LoRA A and B matrices), so g is the difference of the two unit
  gradients the paper's equation names; a per-tensor norm would reweight layers against each
  other and stop being that. eps = 1e-8 keeps g finite when a loss is flat: as ||g_F|| -> 0 the
  step becomes a pure retain descent, never a division by zero.

Learning rate (GeN), every `every` steps (default 10: GeN's "lazy" schedule, as it recommends at
least 4, so the three extra forward passes cost at most 30 % more forwards):
  the parabola is fit on the RETAIN loss of the current retain batch, along the update:
      L- = L_R(theta - eta g),  L0 = L_R(theta),  L+ = L_R(theta + eta g)
  curvature  c = L+ - 2 L0 + L-      (= eta^2 g^T H g)
  slope      s = L+ - L-             (= 2 eta G^T g, G = grad L_R)
  eta* = (eta / 2) * s / c
  Why the retain loss: the forget loss is being *maximised* and is unbounded along the ascent, so
  a parabola through it has no minimum to aim at; the retain loss is the one the update must keep
  low, and its minimum along g is the step that forgets without paying in utility.
  The fit is accepted only when it is convex (c > 0), the update descends (s > 0) and it is good:
  the retain loss at the proposed step is actually below L0 (one more forward pass; with three
  points a parabola always fits exactly, so an R^2 test would say nothing). An accepted eta* is
  clipped to [eta/2, 2 eta] and smoothed, eta <- 0.9 eta + 0.1 eta*; a failed fit halves eta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-8


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads)) if grads else torch.tensor(0.0, dtype=torch.float64)


def ngdiff_direction(
    g_retain: list[torch.Tensor], g_forget: list[torch.Tensor], eps: float = EPS
) -> list[torch.Tensor]:
    """g_R/(||g_R|| + eps) - g_F/(||g_F|| + eps), norms over all tensors together."""
    nr = float(global_norm(g_retain)) + eps
    nf = float(global_norm(g_forget)) + eps
    return [gr / nr - gf / nf for gr, gf in zip(g_retain, g_forget)]


def parabola_step(eta: float, l_minus: float, l0: float, l_plus: float) -> float | None:
    """eta* = (eta/2)(L+ - L-)/(L+ - 2 L0 + L-) with L(+-) = L(theta +- eta g) and the update
    theta - eta g; None when the fit is not convex or the update does not descend."""
    c = l_plus - 2.0 * l0 + l_minus
    s = l_plus - l_minus
    if not (math.isfinite(c) and math.isfinite(s)) or c <= 0 or s <= 0:
        return None
    return (eta / 2.0) * s / c


@dataclass
class GenSchedule:
    """GeN's learning-rate state: the current eta and how it moves."""

    eta: float
    every: int = 10
    smoothing: float = 0.9
    accepted: int = 0
    failed: int = 0

    def due(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    def update(self, proposed: float | None, good: bool) -> float:
        """Clip an accepted proposal to [eta/2, 2 eta] and smooth it in; halve eta otherwise."""
        if proposed is None or not good:
            self.eta *= 0.5
            self.failed += 1
        else:
            clipped = min(max(proposed, self.eta / 2.0), 2.0 * self.eta)
            self.eta = self.smoothing * self.eta + (1.0 - self.smoothing) * clipped
            self.accepted += 1
        return self.eta

    def clipped(self, proposed: float) -> float:
        return min(max(proposed, self.eta / 2.0), 2.0 * self.eta)


class GenDescent(torch.optim.Optimizer):
    """theta <- theta - eta * grad with eta read from the GenSchedule at every step, so GeN's
    refits (made by NGDiff's step before the optimizer steps) move the rate."""

    def __init__(self, params: list[torch.nn.Parameter], gen: GenSchedule) -> None:
        super().__init__(params, {"lr": gen.eta})
        self.gen = gen

    @torch.no_grad()
    def step(self, closure=None) -> None:  # type: ignore[override]  # noqa: ANN001
        for group in self.param_groups:
            group["lr"] = self.gen.eta
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(self.gen.eta * p.grad)
