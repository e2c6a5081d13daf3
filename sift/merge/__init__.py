"""Merge methods (a registry) and the exact accumulator they share."""

from sift.merge.registry import METHODS, MergeMethod, get_method
from sift.merge.state import MergeState

__all__ = ["METHODS", "MergeMethod", "MergeState", "get_method"]
