"""Linear merges: served = base + c(n) * sum_i delta_i, with c depending on the number of adapters
or on nothing, never on data. They share one exact accumulator (sift.merge.state):

    W = fp32( fp64(W0) + fp64(sum) * (c * 2**-bits) )
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sift.merge.base import IncrementalMethod, Param
from sift.merge.state import MergeState


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
