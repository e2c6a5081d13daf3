"""Kept so that `from sift.generate import ...` keeps working; the code lives in sift.serving."""

from sift.serving.generate import greedy_answers
from sift.serving.load import load_routed, load_served

__all__ = ["greedy_answers", "load_routed", "load_served"]
