"""Linear merges: served = base + c(n) * sum_i delta_i, with c depending on the number of adapters
or on nothing, never on data. They share one exact accumulator (sift.merge.state):

    W = fp32( fp64(W0) + fp64(sum) * (c * 2**-bits) )
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sift.errors import SiftError
from sift.merge.base import IncrementalMethod, Param
from sift.merge.state import MergeState, count_name, round_to


class LinearMethod(IncrementalMethod):
    def __init__(
        self,
        name: str,
        summary: str,
        coefficient: Callable[[int, dict[str, float]], float],
        params: tuple[Param, ...] = (),
        needs_training: str | None = None,
    ):
        self.name, self.summary, self._coefficient, self.params = name, summary, coefficient, params
        self.needs_training = needs_training

    def coefficient(self, n: int, scale: float | None = None) -> float:
        """c(n); `scale` is task-arithmetic's parameter (None: its default)."""
        return self._coefficient(n, self.resolve({"scale": scale}))

    def served_record(self, n: int, params: dict[str, float]) -> dict[str, float]:
        return {"coefficient": self._coefficient(n, params)}

    def served_coefficient(self, n: int, params: dict[str, float]) -> float:
        return self._coefficient(n, params)

    def served_weights(
        self, acc: MergeState, base_state: dict[str, torch.Tensor], n: int, params: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        return acc.served_weights(base_state, self._coefficient(n, params))


MEAN = LinearMethod(
    "mean",
    "uniform mean of the adapters' weight deltas: base + (1/n) * sum",
    lambda n, p: 1.0 / n if n else 0.0,
)
TASK_ARITHMETIC = LinearMethod(
    "task-arithmetic",
    "scaled sum of the deltas: base + scale * sum (scale defaults to 1; data-independent)",
    lambda n, p: p["scale"],
    params=(Param("scale", 1.0, "served = base + scale * sum of the adapters' deltas"),),
)
SIFT_MASKS = LinearMethod(
    "sift-masks",
    "SIFT-Masks (arXiv 2504.04626): base + sum/T without a task id; a request routed to shard c gets base + (sum * m_c)/T "
    "with the shard's local mask m_c (needs train.method sift-masks)",
    lambda n, p: 1.0 / n if n else 0.0,
    needs_training="sift-masks",
)


class PerCoordinateMethod(IncrementalMethod):
    """sift's per-coordinate variant of SIFT-Masks (not the paper's): each entry is the mean of
    the deltas of the shards that moved it,

        served   = base + sum / count                 (no task id)
        routed c = base + m_c * sum / count           (a request routed to shard c)

    count = the number of shards whose local mask holds the entry, an exact integer sum of masks
    kept beside the sums. Sign-fixed tuning makes every shard's delta agree in sign with v, so
    this is TIES' disjoint mean without its election: a sum of per-shard terms, hence exact and
    incremental, where TIES must recompute."""

    counts = True

    def __init__(self, name: str, summary: str, needs_training: str):
        self.name, self.summary, self.needs_training = name, summary, needs_training

    def served_coefficient(self, n: int, params: dict[str, float]) -> float:
        return 1.0  # not used: each entry is divided by its own count

    def served_weights(
        self, acc: MergeState, base_state: dict[str, torch.Tensor], n: int, params: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        return acc.served_weights(base_state, 1.0)


SIFT_MASKS_COORDINATE = PerCoordinateMethod(
    "sift-masks-coordinate",
    "sift's per-coordinate variant of SIFT-Masks: base + sum/count without a task id, base + (sum * m_c)/count "
    "routed to shard c; count = shards whose mask holds the entry (needs train.method sift-masks)",
    needs_training="sift-masks",
)


class LowRankMasksMethod(IncrementalMethod):
    """sift's LoRA form of SIFT-Masks (sift.siftmasks.lowrank): the sums hold each weight's sum of
    B ([rows, r]), exact and incremental like every other sum; the served weight is

        W = W0 + s * (sum / T) @ A              or, per coordinate,   W0 + s * (sum / count) @ A
        routed to shard c: the same with m_c * sum (its mask on B)

    with A drawn from the sign seed and the weight's name (shared by every shard) and
    s = lora.alpha / lora.r, both from the workspace's config (`for_workspace`)."""

    lowrank = True

    def __init__(self, name: str, summary: str, counts: bool, scale: float = 0.0, seed: int = 0, rank: int = 0):
        self.name, self.summary, self.counts = name, summary, counts
        self.needs_training = "sift-masks"
        self.scale, self.seed, self.rank = scale, seed, rank

    def for_workspace(self, cfg: Any) -> LowRankMasksMethod:
        return LowRankMasksMethod(
            self.name, self.summary, self.counts, cfg.lora.alpha / cfg.lora.r, cfg.sift_masks.sign_seed, cfg.lora.r
        )

    def served_coefficient(self, n: int, params: dict[str, float]) -> float:
        return 1.0 / n if n else 0.0

    def served_weights(
        self, acc: MergeState, base_state: dict[str, torch.Tensor], n: int, params: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        return self._weights(acc, base_state, n, None)

    def routed_weights(
        self, acc: MergeState, base_state: dict[str, torch.Tensor], n: int, masks: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return self._weights(acc, base_state, n, masks)

    def _weights(
        self, acc: MergeState, base_state: dict[str, torch.Tensor], n: int, masks: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        from sift.siftmasks.lowrank import frozen_a, lowrank_product

        if not self.rank:
            raise SiftError(f"merge method {self.name} needs the workspace's config (for_workspace)")
        out = {}
        for name in acc.weight_names():
            total = acc.acc[name]
            if name not in base_state:
                raise SiftError(f"the base model has no weight {name}: shards and base do not match")
            w0 = base_state[name]
            rows, cols = w0.shape
            if tuple(total.shape) != (rows, self.rank):
                raise SiftError(
                    f"the sum of B for {name} has shape {tuple(total.shape)}, expected {(rows, self.rank)} "
                    "(lora.r and the base must be those the shards were trained with)"
                )
            if masks is not None:
                keep = masks.get(name)
                total = torch.zeros_like(total) if keep is None else torch.where(keep, total, torch.zeros_like(total))
            b = total.to(torch.float64).mul(2.0 ** (-acc.bits))
            if self.counts:
                b = b.div_(acc.acc[count_name(name)].clamp(min=1).to(torch.float64))
            else:
                b = b.mul_(1.0 / n if n else 0.0)
            delta = lowrank_product(b, frozen_a(name, self.rank, cols, self.seed)).mul_(self.scale)
            out[name] = round_to(w0.to(torch.float64) + delta, w0.dtype)
        return out


SIFT_MASKS_LORA = LowRankMasksMethod(
    "sift-masks-lora",
    "sift's LoRA form of SIFT-Masks (sift_masks.form lora): base + s * (sum of B / T) @ A, routed to shard c "
    "base + s * (m_c * sum of B / T) @ A; A shared and seeded, the mask on B",
    counts=False,
)
SIFT_MASKS_LORA_COORDINATE = LowRankMasksMethod(
    "sift-masks-lora-coordinate",
    "the LoRA form's per-coordinate variant: base + s * (sum of B / count) @ A, routed (m_c * sum of B / count); "
    "count = shards whose mask holds each entry of B",
    counts=True,
)
