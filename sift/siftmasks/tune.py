"""Sign-fixed full fine-tuning of one shard (SIFT-Masks, arXiv 2504.04626, Algorithm 1).

After every optimizer step each tuned weight is projected back into the cone tau * v >= 0:
entries whose delta tau = theta - theta0 has the sign v forbids are set back to theta0 exactly.
The paper's Algorithm 1 projects between backward and the step, which leaves the last step's
update unprojected; projecting after the step (the prose's wording) keeps the invariant at every
point, so the stored delta satisfies it exactly.

The shard trains on the loaded base itself (no copy of the model: 13.5 GB for a 7 B base in
bf16) and its tuned weights are put back on the way out. A float32 base is tuned in place. A
bfloat16/float16 base keeps a float32 master copy of each tuned weight: the optimizer updates
the master and the forward pass reads it rounded to the base's dtype, so updates far below one
bf16 ulp still accumulate, and tau = master - fp32(theta0) is a float32 delta like on a float32
base.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.nn.utils import parametrize

from sift.config import SiftConfig
from sift.errors import SiftError
from sift.loop import Example, LoopResult, LoopSettings, StepHooks, run_loop
from sift.models import target_weights  # noqa: F401 - re-exported: it lived here
from sift.siftmasks.signs import disagrees, positive_signs


class _RoundTo(torch.nn.Module):
    """The weight the forward pass sees: the float32 master rounded to the base's dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, master: torch.Tensor) -> torch.Tensor:
        return master.to(self.dtype)


@contextlib.contextmanager
def trainable_weights(model: Any, targets: list[str]) -> Iterator[dict[str, torch.nn.Parameter]]:
    """The target weights as float32 parameters the optimizer can train, by weight name, and the
    base's own weights back in place, with their values, on the way out (whatever happens).

    float32 weights are yielded as they are. A half-precision weight is swapped for a float32
    master through torch's parametrizations (the module reads master.to(dtype)); on exit the
    parametrization is removed and the base's own Parameter object put back, never written."""
    weights = target_weights(model, targets)
    start = {name: p.detach().clone() for name, p in weights.items() if p.dtype == torch.float32}
    modules = dict(model.named_modules())
    swapped: dict[str, tuple[Any, torch.nn.Parameter]] = {}
    try:
        out: dict[str, torch.nn.Parameter] = {}
        for name, p in weights.items():
            if p.dtype == torch.float32:
                out[name] = p
                continue
            module = modules[name.rsplit(".", 1)[0]]
            swapped[name] = (module, p)
            parametrize.register_parametrization(module, "weight", _RoundTo(p.dtype), unsafe=True)
            master = torch.nn.Parameter(p.detach().to(torch.float32))
            module.parametrizations.weight.original = master
            out[name] = master
        yield out
    finally:
        with torch.no_grad():
            for name, value in start.items():
                weights[name].copy_(value)
        for module, own in swapped.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            module.weight = own  # the base's own Parameter: its values were never written


def keep_largest(tau: torch.Tensor, density: float) -> torch.Tensor:
    """tau with only its largest-magnitude entries kept: every entry with |tau| at or above the
    k-th largest, k = ceil(density * numel) (ties at the threshold are all kept, so the choice
    depends on the values alone, not on an order), the rest set to zero. Zeroing keeps
    tau * v >= 0, and the mask {tau != 0} shrinks with it."""
    k = math.ceil(density * tau.numel())
    if k >= tau.numel():
        return tau
    magnitude = tau.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude.cpu(), tau.numel() - k + 1).values.to(tau.device)
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)).contiguous()


def run_projected(
    model: Any,
    params: dict[str, torch.nn.Parameter],
    project: Callable[[int], None],
    examples: Sequence[Example],
    pad_id: int,
    cfg: SiftConfig,
    seed: int,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    progress: Callable[[int, int, float], None] | None,
) -> LoopResult:
    """Train `params` with sift-masks' recipe (train's loop at sift_masks.lr), `project` after
    every step putting them back on the sign-fixed side; both forms (dense, LoRA) run this."""
    settings = LoopSettings.for_training(cfg.train, lr=cfg.sift_masks.lr, examples=len(examples))
    model.train()
    hooks = StepHooks(after_step=[project])
    result = run_loop(
        model, list(params.values()), examples, pad_id, settings, seed, loss_fn, hooks=hooks, progress=progress
    )
    model.eval()
    return result


def tune_sign_fixed(
    model: Any,
    examples: Sequence[Example],
    pad_id: int,
    cfg: SiftConfig,
    seed: int,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], LoopResult]:
    """Fine-tune the target weights of `model` (the loaded base) and put them back; returns each
    weight's delta tau = theta - theta0 (float32, with tau * v >= 0 everywhere) and the loop's
    result. The caller restores requires_grad flags and mode (sift.models.restored_on_exit)."""
    for p in model.parameters():
        p.requires_grad_(False)
    with trainable_weights(model, cfg.sift_masks.target_modules) as weights:
        start = {name: p.detach().clone() for name, p in weights.items()}
        v_pos = {
            name: positive_signs(name, p.shape, cfg.sift_masks.sign_seed).to(p.device) for name, p in weights.items()
        }
        for p in weights.values():
            p.requires_grad_(True)

        def project(_step: int) -> None:
            with torch.no_grad():
                for name, p in weights.items():
                    wrong = disagrees(p - start[name], v_pos[name])
                    p.copy_(torch.where(wrong, start[name], p))

        result = run_projected(model, weights, project, examples, pad_id, cfg, seed, loss_fn, progress)
        with torch.no_grad():
            deltas = {name: (p.detach() - start[name]).contiguous() for name, p in weights.items()}
            if cfg.sift_masks.density < 1.0:
                deltas = {name: keep_largest(tau, cfg.sift_masks.density) for name, tau in deltas.items()}
    for name, tau in deltas.items():  # the invariant the masks rest on; cheap to re-check
        if bool(disagrees(tau, v_pos[name]).any()):  # pragma: no cover - the projection forbids it
            raise SiftError(f"sign-fixed tuning broke tau * v >= 0 on {name}")
    return deltas, result
