"""What a merge method is: a name, declared parameters, and two promises the pipeline consults.

- `exact`: a forget followed by this merge gives the bytes of a from-scratch run on the
  remaining data. Every method sift ships is exact; a method whose result depends on the order
  adapters arrived in, or on anything but the surviving adapters, would not be.
- `incremental`: the method is a sum of per-adapter contributions and keeps that sum (the int64
  `MergeState`) as its sufficient statistic, so removing or replacing one adapter costs one
  adapter's work. A non-incremental method (TIES elects signs from every adapter) recomputes
  from all stored adapters after a forget; it stays exact, and the certificate says it recomputed.

The merge driver (sift.merge.driver) and forget (sift.exact.forget) ask these flags; they never assume a
particular method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from sift.adapters import Adapter
from sift.errors import SiftError
from sift.merge.state import MergeState


@dataclass(frozen=True)
class Param:
    """A method parameter; `name` is also its key in the [merge] section of sift.toml."""

    name: str
    default: float
    help: str
    low: float | None = None  # inclusive bounds, None for unbounded
    high: float | None = None

    def check(self, value: float) -> float:
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise SiftError(f"merge parameter {self.name}={value:g} is out of range [{lo}, {hi}]")
        return float(value)


class MergeMethod(ABC):
    name: str
    summary: str
    exact: bool = True
    incremental: bool = False
    params: tuple[Param, ...] = ()
    needs_training: str | None = None  # a train.method the shards must have been trained with
    lowrank: bool = False  # merges the LoRA form of SIFT-Masks (sums of B, sift_masks.form lora)

    def resolve(self, given: dict[str, float | None]) -> dict[str, float]:
        """Fill defaults, check ranges, refuse parameters this method does not take."""
        known = {p.name: p for p in self.params}
        for key, value in given.items():
            if value is not None and key not in known:
                raise SiftError(
                    f"merge parameter {key!r} does not apply to merge method {self.name!r}"
                    + (f" (it takes: {', '.join(known)})" if known else " (it takes no parameters)")
                )
        return {p.name: p.check(given[p.name]) if given.get(p.name) is not None else p.default for p in self.params}

    def served_record(self, n: int, params: dict[str, float]) -> dict[str, Any]:
        """Extra facts about a merge of n adapters, saved in served.json (e.g. a coefficient)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "exact": self.exact,
            "incremental": self.incremental,
            "summary": self.summary,
            "params": [{"name": p.name, "default": p.default, "help": p.help} for p in self.params],
        }


class IncrementalMethod(MergeMethod):
    """A merge that is a function of the exact integer sum of the adapters' deltas."""

    incremental = True
    counts = False  # keeps per-entry counts of nonzero deltas beside the sums (a per-coordinate mean)

    def for_workspace(self, cfg: Any) -> IncrementalMethod:
        """This method with what it needs of the workspace's config (none, for most)."""
        return self

    def routed_weights(
        self, acc: MergeState, base_state: dict[str, torch.Tensor], n: int, masks: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The weights a request routed to one SIFT-Masks shard gets: the sums with that shard's
        local mask applied (only methods over sift-masks shards serve them)."""
        return acc.served_weights(base_state, 1.0 / n if n else 0.0, masks=masks)

    @abstractmethod
    def served_coefficient(self, n: int, params: dict[str, float]) -> float:
        """c in served = base + c * sum, for n adapters."""

    @abstractmethod
    def served_weights(
        self, acc: MergeState, base_state: dict[str, torch.Tensor], n: int, params: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """Merged values of every weight the adapters touch, from the sum of n adapters."""


class RecomputedMethod(MergeMethod):
    """A merge that needs every adapter at once (not a sum): recomputed after each forget.

    It is defined one weight at a time (`merge_weight`), so the driver can stream: read one base
    weight, merge it, write it, drop it; memory holds one weight's S deltas, never the model."""

    incremental = False

    @abstractmethod
    def merge_weight(
        self, adapters: list[Adapter], name: str, w0: torch.Tensor, params: dict[str, float], bits: int
    ) -> torch.Tensor:
        """The merged value of base weight `name` (value `w0`); must not depend on list order.
        `bits`: the workspace's fixed-point resolution (merge.fixed_point_bits), for methods that
        compute on the exact integer deltas."""

    def merge(
        self, adapters: list[Adapter], base_state: Any, params: dict[str, float], bits: int
    ) -> dict[str, torch.Tensor]:
        """Merged values of every weight the adapters touch, all in memory (tests and small models;
        the driver streams through `merge_weight` where the base's files allow)."""
        out: dict[str, torch.Tensor] = {}
        for name in sorted({n for a in adapters for n in a.modules}):
            if name not in base_state:
                raise SiftError(f"the base model has no weight {name}: adapters and base do not match")
            out[name] = self.merge_weight(adapters, name, base_state[name], params, bits)
        return out


def parse_params(specs: list[str] | None) -> dict[str, float]:
    """`--param key=value` (repeatable) as a {key: number} mapping; which keys a method takes is
    its own business (MergeMethod.resolve)."""
    out: dict[str, float] = {}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SiftError(f"--param {spec!r}: expected key=value, e.g. --param density=0.3")
        try:
            number = float(value)
        except ValueError:
            raise SiftError(f"--param {spec!r}: {key} needs a number, got {value.strip()!r}") from None
        if key in out and out[key] != number:
            raise SiftError(f"--param {key} is given twice")
        out[key] = number
    return out
