"""Recall of trained facts by greedy decoding (sift.serving.generate.greedy_answers): did the model
learn (or forget) them, and does it still know what the base knew?"""

from __future__ import annotations

import re
from typing import Any


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def fact_recall(answers: list[str], rows: list[dict[str, Any]], paraphrased: bool = False) -> dict[str, float]:
    """exact: the answer is the trained completion (normalised); contains: the fact's value appears.

    With `paraphrased` the answers are to the rows' paraphrased questions, and an exact answer
    may be either the trained sentence or the paraphrased one (both state the fact in full)."""

    def exact_ok(a: str, r: dict[str, Any]) -> bool:
        targets = [r["completion"]] + (
            [r["paraphrased_completion"]] if paraphrased and r.get("paraphrased_completion") else []
        )
        return normalize(a) in {normalize(t) for t in targets}

    exact = sum(exact_ok(a, r) for a, r in zip(answers, rows))
    contains = sum(normalize(r["answer"]) in normalize(a) for a, r in zip(answers, rows))
    n = max(1, len(rows))
    return {"n": len(rows), "exact": exact / n, "contains": contains / n}


_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+|\w+")


def _tokens(text: str) -> list[str]:
    """Lower-cased words, with a number (decimals included) as one token: "-18.0" is "18.0"."""
    return _TOKEN.findall(text.lower())


def general_correct(answer: str, accepted: list[str]) -> bool:
    """Any accepted answer appears in the answer as a run of whole tokens ("0" matches neither
    "100" nor "-18.0"; "paris" does not match "parisian")."""
    words = _tokens(answer)
    for a in accepted:
        want = _tokens(a)
        if want and any(words[i : i + len(want)] == want for i in range(len(words) - len(want) + 1)):
            return True
    return False


def general_recall(answers: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Share of general-knowledge questions (sift.builtin.general) answered correctly."""
    right = sum(general_correct(a, r["answers"]) for a, r in zip(answers, rows))
    return {"n": len(rows), "correct": right / max(1, len(rows))}
