"""One deterministic training loop, shared by every method that fine-tunes a model.

The loss and the per-step hooks are parameters, so a new method (sign-fixed tuning, forget/retain
batches, a reference model, parameter masks, an adaptive learning rate) reuses the batching, the
seeded batch order, the optimizer, the schedule and the clipping instead of copying them. For the
same inputs and seed the loop performs the same float operations in the same order, so it gives
the same bytes on the same machine.

Order of one step:  loss = loss_fn(lm, batch);  loss.backward();  hooks.after_backward;
clip;  optimizer.step();  scheduler.step();  hooks.after_step;  zero_grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Example = tuple[list[int], list[int]]  # (input ids, labels with -100 where there is no loss)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids, attention mask, labels
LossFn = Callable[[Any, Batch], torch.Tensor]
Hook = Callable[[int], None]  # called with the 1-based step number


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class StepHooks:
    """`after_backward`: gradients are there, nothing has moved (mask or rescale them).
    `after_step`: the optimizer has moved the parameters (project them back, log)."""

    after_backward: list[Hook] = field(default_factory=list)
    after_step: list[Hook] = field(default_factory=list)


@dataclass
class LoopResult:
    steps: int
    final_loss: float


def batches(examples: Sequence[Example], batch_size: int, order: list[int], pad_id: int) -> Iterator[Batch]:
    """Right-padded batches in the given order (pads carry no attention and no loss)."""
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (x, y) in enumerate(chunk):
            ids[j, : len(x)] = torch.tensor(x)
            labels[j, : len(y)] = torch.tensor(y)
            mask[j, : len(x)] = 1
        yield ids, mask, labels


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over `warmup` steps, then linear decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def total_steps(num_examples: int, s: LoopSettings) -> int:
    return math.ceil(num_examples / s.batch_size) * s.epochs


def run_loop(
    lm: Any,
    params: list[torch.nn.Parameter],
    examples: Sequence[Example],
    pad_id: int,
    settings: LoopSettings,
    seed: int,
    loss_fn: LossFn,
    hooks: StepHooks | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> LoopResult:
    """AdamW over `params` for `settings.epochs` passes over `examples`, in an order drawn from
    `seed` alone (a private generator: the global RNG is not touched)."""
    hooks = hooks or StepHooks()
    s = settings
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    total = total_steps(len(examples), s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, s.warmup_steps))
    order_gen = torch.Generator().manual_seed(seed)
    step, loss_value = 0, float("nan")
    for _epoch in range(s.epochs):
        order = torch.randperm(len(examples), generator=order_gen).tolist()
        for batch in batches(examples, s.batch_size, order, pad_id):
            loss = loss_fn(lm, batch)
            loss.backward()
            step += 1
            for hook in hooks.after_backward:
                hook(step)
            if s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            scheduler.step()
            for hook in hooks.after_step:
                hook(step)
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            if progress is not None:
                progress(step, total, loss_value)
    return LoopResult(step, loss_value)
