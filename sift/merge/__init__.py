"""Merge methods (a registry of objects that declare their parameters, exactness and
incrementality) and the exact accumulator the incremental ones share."""

from sift.merge.base import IncrementalMethod, MergeMethod, Param, RecomputedMethod
from sift.merge.registry import METHODS, get_method
from sift.merge.state import MergeState

__all__ = ["METHODS", "IncrementalMethod", "MergeMethod", "MergeState", "Param", "RecomputedMethod", "get_method"]
