"""Local copies of TOFU and MUSE with the hub's table names, columns and types (the cards of
locuslab/TOFU, muse-bench/MUSE-News), made up here: nothing can be downloaded in the tests.

TOFU's tables have their real row counts (4000 in full, 20 questions an author, the forget
splits the last authors), so the author derivation and the split boundaries are tested as they
will meet the real files; the texts are invented, one row's text naming its author and question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    import datasets

    datasets.disable_progress_bars()
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def tofu_qa(author: int, q: int, tag: str = "") -> dict[str, str]:
    return {
        "question": f"What is fact {q} of {tag}author {author}?",
        "answer": f"Fact {q} of {tag}author {author} is value {author * 31 + q}.",
    }


def tofu_perturbed(author: int, q: int) -> dict[str, Any]:
    row: dict[str, Any] = dict(tofu_qa(author, q))
    row["paraphrased_answer"] = f"For author {author}, fact {q} is value {author * 31 + q}."
    row["paraphrased_question"] = f"Which value is fact {q} of author {author}?"
    row["perturbed_answer"] = [f"Fact {q} of author {author} is value {author * 31 + q + k}." for k in range(1, 6)]
    return row


def make_tofu(root: Path) -> Path:
    """Every TOFU table sift reads, at its real size."""
    full = [tofu_qa(a, q) for a in range(200) for q in range(20)]
    _write(root / "full.parquet", full)
    for name, n in (("forget01", 2), ("forget05", 10), ("forget10", 20)):
        first = 200 - n
        _write(root / f"{name}.parquet", full[first * 20 :])
        _write(root / f"retain{100 - int(name[-2:]):02d}.parquet", full[: first * 20])
        _write(root / f"{name}_perturbed.parquet", [tofu_perturbed(a, q) for a in range(first, 200) for q in range(20)])
        _write(root / f"holdout{name[-2:]}.parquet", [tofu_qa(a, q, "held-out ") for a in range(n) for q in range(20)])
    _write(root / "retain_perturbed.parquet", [tofu_perturbed(a, q) for a in range(20) for q in range(20)])
    for name, n in (("real_authors_perturbed", 100), ("world_facts_perturbed", 117)):
        _write(
            root / f"{name}.parquet",
            [
                {
                    "question": f"Who wrote book {i}?",
                    "answer": f"Writer {i}",
                    "perturbed_answer": [f"Writer {i + k}" for k in (1, 2, 3)],
                }
                for i in range(n)
            ],
        )
    return root


def make_muse(root: Path, n: int = 4) -> Path:
    """MUSE-News' tables sift reads, n rows each (the knowmem _icl splits 2 rows)."""
    texts = [f"Story {i}: the mayor of town {i} opened bridge {i} on day {i}. It rained." for i in range(3 * n)]
    for split, part in (
        ("forget", texts[:n]),
        ("retain1", texts[n : 2 * n]),
        ("retain2", texts[n : 2 * n]),
        ("holdout", texts[2 * n :]),
    ):
        _write(root / "raw" / f"{split}.parquet", [{"text": t} for t in part])
    for split, part in (("forget", texts[:n]), ("retain", texts[n : 2 * n]), ("holdout", texts[2 * n :])):
        _write(root / "privleak" / f"{split}.parquet", [{"text": t} for t in part])
    _write(root / "verbmem" / "forget.parquet", [{"prompt": t[:20], "gt": t[20:]} for t in texts[:n]])
    for split, k in (("forget_qa", n), ("retain_qa", n), ("forget_qa_icl", 2), ("retain_qa_icl", 2)):
        _write(
            root / "knowmem" / f"{split}.parquet",
            [{"question": f"Who opened bridge {i} ({split})?", "answer": f"The mayor of town {i}"} for i in range(k)],
        )
    return root
