"""Merge methods by name. Each says whether it is exact (a forget gives the from-scratch bytes)
and incremental (a forget costs one adapter's work, whatever the number of shards).

The methods here are linear in the adapters' deltas,

    served = base + coefficient(n) * sum_i delta_i,

so they share one exact accumulator (sift.merge.state) and differ only in the coefficient,
which depends on the number of adapters or on nothing: never on data, so they stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sift.errors import SiftError


@dataclass(frozen=True)
class MergeMethod:
    name: str
    exact: bool
    incremental: bool
    summary: str
    coefficient: Callable[[int, float | None], float]


def _mean(n: int, scale: float | None) -> float:
    if scale is not None:
        raise SiftError("--scale belongs to task-arithmetic; mean always uses 1/n")
    return 1.0 / n if n else 0.0


def _task_arithmetic(n: int, scale: float | None) -> float:
    return 1.0 if scale is None else float(scale)


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("mean", True, True, "uniform mean of the adapters' weight deltas: base + (1/n) * sum", _mean),
        MergeMethod(
            "task-arithmetic", True, True,
            "scaled sum of the deltas: base + scale * sum (scale defaults to 1; data-independent)",
            _task_arithmetic,
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise SiftError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
