"""Sign-fixed full fine-tuning of one shard (SIFT-Masks, arXiv 2504.04626, Algorithm 1).

After every optimizer step each tuned weight is projected back into the cone tau * v >= 0:
entries whose delta tau = theta - theta0 has the sign v forbids are set back to theta0 exactly.
The paper's Algorithm 1 projects between backward and the step, which leaves the last step's
update unprojected; projecting after the step (the prose's wording) keeps the invariant at every
point, so the stored delta satisfies it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sift.config import SiftConfig
from sift.errors import SiftError
from sift.loop import Example, LoopResult, LoopSettings, StepHooks, run_loop
from sift.models import target_weights  # noqa: F401 - re-exported: it lived here
from sift.siftmasks.signs import disagrees, positive_signs


def tune_sign_fixed(
    model: Any,
    examples: Sequence[Example],
    pad_id: int,
    cfg: SiftConfig,
    seed: int,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], LoopResult]:
    """Fine-tune `model` in place on the target weights alone; returns each weight's delta
    tau = theta - theta0 (float32, with tau * v >= 0 everywhere) and the loop's result."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights = target_weights(model, cfg.sift_masks.target_modules)
    start = {name: p.detach().clone() for name, p in weights.items()}
    v_pos = {name: positive_signs(name, p.shape, cfg.sift_masks.sign_seed) for name, p in weights.items()}
    for p in weights.values():
        p.requires_grad_(True)

    def project(_step: int) -> None:
        with torch.no_grad():
            for name, p in weights.items():
                wrong = disagrees(p - start[name], v_pos[name])
                p.copy_(torch.where(wrong, start[name], p))

    t = cfg.train
    settings = LoopSettings.for_training(t, lr=cfg.sift_masks.lr)
    model.train()
    result = run_loop(
        model,
        list(weights.values()),
        examples,
        pad_id,
        settings,
        seed,
        loss_fn,
        hooks=StepHooks(after_step=[project]),
        progress=progress,
    )
    model.eval()
    with torch.no_grad():
        deltas = {name: (p.detach() - start[name]).contiguous() for name, p in weights.items()}
    for name, tau in deltas.items():  # the invariant the masks rest on; cheap to re-check
        if bool(disagrees(tau, v_pos[name]).any()):  # pragma: no cover - the projection forbids it
            raise SiftError(f"sign-fixed tuning broke tau * v >= 0 on {name}")
    return deltas, result
