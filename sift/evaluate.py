"""Recall of trained facts by greedy decoding (sift.generate.greedy_answers): did the model
learn (or forget) them?"""

from __future__ import annotations

import re
from typing import Any


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def fact_recall(answers: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    """exact: the answer is the trained completion (normalised); contains: the fact's value appears."""
    exact = sum(normalize(a) == normalize(r["completion"]) for a, r in zip(answers, rows))
    contains = sum(normalize(r["answer"]) in normalize(a) for a, r in zip(answers, rows))
    n = max(1, len(rows))
    return {"n": len(rows), "exact": exact / n, "contains": contains / n}
