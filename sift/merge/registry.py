"""Merge methods by name. `sift merge --list` prints what each declares."""

from __future__ import annotations

from sift.errors import SiftError
from sift.merge.base import MergeMethod
from sift.merge.linear import (
    MEAN,
    SIFT_MASKS,
    SIFT_MASKS_COORDINATE,
    SIFT_MASKS_LORA,
    SIFT_MASKS_LORA_COORDINATE,
    TASK_ARITHMETIC,
)
from sift.merge.ties import TIES

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MEAN,
        TASK_ARITHMETIC,
        TIES,
        SIFT_MASKS,
        SIFT_MASKS_COORDINATE,
        SIFT_MASKS_LORA,
        SIFT_MASKS_LORA_COORDINATE,
    )
}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise SiftError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
