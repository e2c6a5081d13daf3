"""The benchmarks unlearning researchers publish on, read as sift rows: TOFU and MUSE.

A benchmark table is named `NAME:TABLE[@SOURCE]` wherever sift takes data (`--data`, `--holdout`):
`tofu:forget10`, `tofu:retain_perturbed`, `muse-news:raw/forget`, `muse-books:knowmem/retain_qa`.
SOURCE is the hub repo (the real name by default: locuslab/TOFU, muse-bench/MUSE-News,
muse-bench/MUSE-Books) or a local folder holding the same tables (sift.benchmarks.hub).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sift.errors import SiftError


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub: str
    load: Callable[[str, str], list[dict[str, Any]]]  # (table, source) -> rows


def _tofu(table: str, source: str) -> list[dict[str, Any]]:
    from sift.benchmarks import tofu

    return tofu.load(table, source)


def _muse(corpus: str) -> Callable[[str, str], list[dict[str, Any]]]:
    def load(table: str, source: str) -> list[dict[str, Any]]:
        from sift.benchmarks import muse

        return muse.load(corpus, table, source)

    return load


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("tofu", "locuslab/TOFU", _tofu),
        Benchmark("muse-news", "muse-bench/MUSE-News", _muse("muse-news")),
        Benchmark("muse-books", "muse-bench/MUSE-Books", _muse("muse-books")),
    )
}

_SPEC = re.compile(r"^(?P<name>[a-z-]+):(?P<table>[A-Za-z0-9_/]+)(?:@(?P<source>.+))?$")


def is_spec(source: str) -> bool:
    """Does `source` name a benchmark table (and not a file or a hub data set)?"""
    m = _SPEC.match(source)
    return bool(m) and m.group("name") in BENCHMARKS


def load_spec(source: str) -> list[dict[str, Any]]:
    """The rows of `NAME:TABLE[@SOURCE]`."""
    m = _SPEC.match(source)
    if not m or m.group("name") not in BENCHMARKS:
        raise SiftError(
            f"{source!r} names no benchmark table: use NAME:TABLE[@SOURCE], NAME one of {', '.join(BENCHMARKS)}"
        )
    b = BENCHMARKS[m.group("name")]
    return b.load(m.group("table"), m.group("source") or b.hub)
