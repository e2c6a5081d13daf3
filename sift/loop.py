"""One deterministic training loop, shared by every method that moves weights.

Fine-tuning a shard, sign-fixed tuning, the relearning attack, every approximate unlearning
method and the worst-case search's lower level all run `optimise`: the step function and the
optimizer are parameters, so a new method brings its loss (or its whole gradient procedure:
sharpness-aware smoothing, NGDiff's normalised difference) and reuses the seeded batch order,
the clipping, the hooks, the schedule and the step count instead of copying them. For the same
inputs and seed the loop performs the same float operations in the same order, so it gives the
same bytes on the same machine.

Order of one step:  step_fn(item, step) leaves gradients in p.grad;  hooks.after_backward;
clip;  hooks.before_step;  optimizer.step();  scheduler.step();  hooks.after_step;  zero_grad.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Example = tuple[list[int], list[int]]  # (input ids, labels with -100 where there is no loss)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids, attention mask, labels
LossFn = Callable[[Any, Batch], torch.Tensor]
Hook = Callable[[int], None]  # called with the 1-based step number
SCHEDULES = ("linear", "constant")


@dataclass
class LoopSettings:
    """`schedule`: "linear" warms up over `warmup_steps` then decays to zero (fine-tuning);
    "constant" keeps `lr` (unlearning; a method's own optimizer may move it, as GeN does)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping
    schedule: str = "linear"

    @staticmethod
    def for_training(
        t: Any, epochs: int | None = None, lr: float | None = None, examples: int | None = None
    ) -> LoopSettings:
        """A shard's fine-tuning recipe from its [train] section (`t`, a config.TrainConfig);
        `epochs` and `lr` override it (a SISA stage's epochs, SIFT-Masks' own rate). With
        `examples` (the shard's row count) and a `t.min_steps` floor, a small shard runs whole
        epochs until it has taken at least min_steps steps: its own row count alone decides."""
        if epochs is None:
            epochs = t.epochs
            floor = getattr(t, "min_steps", 0)
            if floor and examples:
                epochs = max(epochs, math.ceil(floor / math.ceil(examples / t.batch_size)))
        return LoopSettings(
            epochs,
            t.batch_size,
            t.lr if lr is None else lr,
            t.weight_decay,
            t.warmup_steps,
            t.max_grad_norm,
        )


@dataclass
class StepHooks:
    """`after_backward`: gradients are there, nothing has moved (rescale them).
    `before_step`: gradients are clipped (mask them: a mask here leaves the clipping norm as the
    full gradient's). `after_step`: the optimizer has moved the parameters (project them back)."""

    after_backward: list[Hook] = field(default_factory=list)
    before_step: list[Hook] = field(default_factory=list)
    after_step: list[Hook] = field(default_factory=list)


@dataclass
class LoopResult:
    steps: int
    final_loss: float


@dataclass
class StepInput:
    """One step's data: its 1-based epoch, the examples it holds (indices) and their batch."""

    epoch: int
    indices: list[int]
    batch: Any


StepFn = Callable[[StepInput, int], "torch.Tensor | float"]  # leaves gradients in p.grad; returns the loss
OptimizerFactory = Callable[[list[torch.nn.Parameter], LoopSettings], torch.optim.Optimizer]


def batches(
    examples: Sequence[Example], batch_size: int, order: list[int], pad_id: int, device: Any = None
) -> Iterator[Batch]:
    """Right-padded batches in the given order (pads carry no attention and no loss), on
    `device` (the model's; None: the CPU)."""
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        cpu = torch.device("cpu")  # built on the CPU by name (never on a default device), then moved
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long, device=cpu)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long, device=cpu)
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=cpu)
        for j, (x, y) in enumerate(chunk):
            ids[j, : len(x)] = torch.tensor(x, device=cpu)
            labels[j, : len(y)] = torch.tensor(y, device=cpu)
            mask[j, : len(x)] = 1
        if device is not None:
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        yield ids, mask, labels


def seeded_batches(
    examples: Sequence[Example], batch_size: int, epochs: int, seed: int, pad_id: int, device: Any = None
) -> Iterator[StepInput]:
    """`epochs` passes over `examples`, each in an order drawn from `seed` alone (a private
    generator: the global RNG is not touched), drawn when its epoch starts."""
    order_gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(examples), generator=order_gen, device="cpu").tolist()
        chunks = batches(examples, batch_size, order, pad_id, device)
        for start, batch in zip(range(0, len(order), batch_size), chunks):
            yield StepInput(epoch, order[start : start + batch_size], batch)


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warm-up over `warmup` steps, then linear decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def total_steps(num_examples: int, s: LoopSettings) -> int:
    return math.ceil(num_examples / s.batch_size) * s.epochs


def adamw(params: list[torch.nn.Parameter], s: LoopSettings) -> torch.optim.Optimizer:
    """AdamW with its single-tensor implementation pinned on every device (torch picks foreach
    on CUDA and the for-loop on the CPU by default: different float orders, different bytes)."""
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, foreach=False, fused=False)


class SignDescent(torch.optim.Optimizer):
    """signSGD: theta <- theta - lr * sign(grad) (the worst-case search's lower level)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * torch.sign(p.grad))


def optimise(
    params: list[torch.nn.Parameter],
    inputs: Iterable[StepInput],
    total: int,
    settings: LoopSettings,
    step_fn: StepFn,
    optimizer: OptimizerFactory | None = None,
    hooks: StepHooks | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> LoopResult:
    """Run `step_fn` on every input and move `params` with the optimizer (AdamW by default);
    `total` is the planned step count (the linear schedule and progress use it). `on_epoch(e)`
    runs after the last step of each epoch."""
    if settings.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {settings.schedule!r}: use one of {', '.join(SCHEDULES)}")
    hooks = hooks or StepHooks()
    s = settings
    opt = (optimizer or adamw)(params, s)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, s.warmup_steps))
        if s.schedule == "linear"
        else None
    )
    step, loss_value, epoch = 0, float("nan"), None
    for item in inputs:
        if epoch is not None and item.epoch != epoch and on_epoch is not None:
            on_epoch(epoch)
        epoch = item.epoch
        step += 1
        loss = step_fn(item, step)
        for hook in hooks.after_backward:
            hook(step)
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        for hook in hooks.before_step:
            hook(step)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        for hook in hooks.after_step:
            hook(step)
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if progress is not None:
            progress(step, total, loss_value)
    if epoch is not None and on_epoch is not None:
        on_epoch(epoch)
    return LoopResult(step, loss_value)


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
    """Fine-tuning: AdamW on `loss_fn` over `settings.epochs` seeded passes over `examples`."""

    def step_fn(item: StepInput, _step: int) -> torch.Tensor:
        loss = loss_fn(lm, item.batch)
        loss.backward()
        return loss

    device = params[0].device if params else None
    inputs = seeded_batches(examples, settings.batch_size, settings.epochs, seed, pad_id, device)
    total = total_steps(len(examples), settings)
    return optimise(params, inputs, total, settings, step_fn, hooks=hooks, progress=progress)
