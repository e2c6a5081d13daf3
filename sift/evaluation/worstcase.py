"""Worst-case forget sets: the K rows an approximate unlearning method forgets worst.

Fan et al., "Challenging Forgets: Unveiling the Worst-Case Forget Sets in Machine Unlearning"
(ECCV 2024) choose the forget set by bi-level optimisation. With selection weights
w in {0,1}^N, sum w = K:

    upper:  min_w   sum_i w_i * l(theta_u(w); z_i)  +  gamma * ||w||^2
    lower:  theta_u(w) = the approximate unlearning method run from the original model theta_o
            on forget set w

The upper objective is the unlearned model's loss on the rows it was asked to forget; minimising
it picks the rows the model still fits after unlearning: the hardest to forget. As in the
paper, the lower level is a few signSGD steps (full-batch, on the one training loop), theta <- theta - beta * sign(grad), whose
Jacobian with respect to w vanishes almost everywhere, so the upper gradient is the partial
one, l_i(theta_u) + 2 gamma w_i; w is relaxed to [0, 1]^N, moved by projected gradient descent
onto {0 <= w <= 1, sum w = K} (the capped simplex, by bisection on the shift), and the top K
of the final w are the worst-case set.

The lower level here is GradDiff with soft weights, the form the paper writes for its
approximate methods: -(sum_i w_i NLL_i)/sum w + (sum_i (1 - w_i) NLL_i)/sum (1 - w), on the
trainable LoRA factors of the monolithic adapter, restarted from theta_o at every upper step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from sift.errors import SiftError


@dataclass
class WorstCaseSettings:
    size: int  # K, the forget-set size
    iterations: int = 5  # upper-level projected-gradient steps
    unlearn_steps: int = 2  # signSGD steps of the lower level per upper step
    theta_lr: float = 1e-3  # signSGD step size beta
    w_lr: float = 0.5  # upper step size alpha (NLLs are O(1), w in [0, 1])
    gamma: float = 1e-4  # the l2 term on w
    batch_size: int = 8

    def check(self, n: int) -> None:
        if not 1 <= self.size < n:
            raise SiftError(f"--size must lie in 1..{n - 1} (the data holds {n} rows), got {self.size}")
        if self.iterations < 1 or self.unlearn_steps < 0 or self.batch_size < 1:
            raise SiftError("worst-case search: iterations and batch size >= 1, unlearn steps >= 0")
        for name in ("theta_lr", "w_lr"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise SiftError(f"worst-case search: {name} must be a positive number, got {v}")


def project_capped_simplex(a: np.ndarray, k: float, tol: float = 1e-10, max_iter: int = 200) -> np.ndarray:
    """The point of {0 <= w <= 1, sum w = k} nearest to `a`: clip(a - mu, 0, 1) with mu found by
    bisection (sum clip(a - mu, 0, 1) falls as mu rises)."""
    lo, hi = float(a.min()) - 1.0, float(a.max())
    for _ in range(max_iter):
        mu = (lo + hi) / 2
        total = float(np.clip(a - mu, 0.0, 1.0).sum())
        if abs(total - k) <= tol:
            break
        if total > k:
            lo = mu
        else:
            hi = mu
    return np.clip(a - mu, 0.0, 1.0)


def search(losses_after_unlearning: Callable[[np.ndarray], np.ndarray], n: int, s: WorstCaseSettings) -> dict[str, Any]:
    """Projected gradient on w; `losses_after_unlearning(w)` runs the lower level for w and
    returns every row's loss under the unlearned model. Returns the top-K indices and the
    objective after each upper step (on the relaxed w)."""
    w = np.full(n, s.size / n)
    history: list[float] = []
    for _ in range(s.iterations):
        losses = np.asarray(losses_after_unlearning(w), dtype=np.float64)
        history.append(float(w @ losses + s.gamma * (w @ w)))
        w = project_capped_simplex(w - s.w_lr * (losses + 2 * s.gamma * w), s.size)
    chosen = np.argsort(-w, kind="stable")[: s.size]
    final = np.asarray(losses_after_unlearning(_binary(chosen, n)), dtype=np.float64)
    return {
        "chosen": sorted(int(i) for i in chosen),
        "objective_history": history,
        "chosen_mean_loss": float(final[chosen].mean()),
        "w": w.tolist(),
    }


def _binary(idx: np.ndarray, n: int) -> np.ndarray:
    w = np.zeros(n)
    w[idx] = 1.0
    return w


def worst_case_forget_set(model: Any, tok: Any, rows: list[dict[str, Any]], s: WorstCaseSettings) -> dict[str, Any]:
    """Search on a trainable peft model (its LoRA factors are the lower level's variables; they
    are restored after every lower-level run and at the end)."""
    from sift.loop import LoopSettings, SignDescent, StepInput, batches, optimise
    from sift.models import example_ids
    from sift.unlearn.objectives import answer_logprobs

    s.check(len(rows))
    rows = sorted(rows, key=lambda r: r["id"])
    examples = [example_ids(tok, r.get("prompt"), r.get("completion"), r.get("text")) for r in rows]
    pad = tok.pad_token_id
    lm = model.base_model.model if hasattr(model, "base_model") else model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SiftError("worst-case search needs a model with trainable (LoRA) weights")
    theta0 = [p.detach().clone() for p in params]
    model.eval()
    order = list(range(len(rows)))

    def per_row_nll() -> torch.Tensor:
        out = []
        for b in batches(examples, s.batch_size, order, pad, params[0].device):
            lp, ln = answer_logprobs(lm, b)
            out.append(-lp / ln.clamp(min=1))
        return torch.cat(out)

    loop = LoopSettings(
        epochs=s.unlearn_steps, batch_size=len(rows), lr=s.theta_lr, max_grad_norm=0.0, schedule="constant"
    )

    def losses_after_unlearning(w: np.ndarray) -> np.ndarray:
        wt = torch.tensor(w, dtype=torch.float32, device=params[0].device)

        def soft_graddiff(_item: StepInput, _step: int) -> torch.Tensor:
            """The lower level's loss on every row at once, its gradient into p.grad."""
            nll = per_row_nll()
            forget = (wt * nll).sum() / wt.sum().clamp(min=1e-12)
            keep = 1.0 - wt
            retain = (keep * nll).sum() / keep.sum().clamp(min=1e-12)
            loss = -forget + retain
            for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
                p.grad = g
            return loss

        full_batch = [StepInput(k, order, None) for k in range(1, s.unlearn_steps + 1)]
        try:
            optimise(params, full_batch, s.unlearn_steps, loop, soft_graddiff, lambda p, ls: SignDescent(p, ls.lr))
            with torch.no_grad():
                return per_row_nll().double().cpu().numpy()
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, theta0):
                    p.copy_(p0)

    found = search(losses_after_unlearning, len(rows), s)
    found["ids"] = [rows[i]["id"] for i in found["chosen"]]
    found["settings"] = asdict(s)
    return found


def random_forget_set(rows: list[dict[str, Any]], size: int, seed: int = 0) -> list[str]:
    """K rows drawn from the seed alone (the control beside the worst-case set)."""
    from sift.hashing import hash_order

    if not 1 <= size < len(rows):
        raise SiftError(f"--size must lie in 1..{len(rows) - 1} (the data holds {len(rows)} rows), got {size}")
    return sorted(hash_order((r["id"] for r in rows), key=str, salt=f"random-forget|{seed}|")[:size])
