"""TOFU (Maini et al., COLM 2024; `locuslab/TOFU` on the hub) as sift rows.

TOFU has 200 fictitious authors with 20 questions each, 4000 rows in `full`, stored author by
author. It has no author column, so sift derives the owner from a row's position: rows 20a to
20a + 19 of `full` are author a. The forget splits are the last authors of `full` (forget01 the
last 2, forget05 the last 10, forget10 the last 20; their first rows are the first rows of those
authors) and retain99/95/90 the others, so a row has one id in every config that holds it:
`tofu-AAA-QQ` (author, question within the author). The held-out authors (holdout01/05/10, for
membership inference) are other people and get ids `tofu-holdout-AAA-QQ`. This derivation rests on
the card's row counts and its row order (20 a person, the forget sets at the end); it is checked
here on counts, which a copy that is not TOFU fails.

Configs (every one has the single split `train`):
- full, forget01|05|10, retain99|95|90: question, answer. Training rows.
- forget01|05|10_perturbed, retain_perturbed (the first 20 authors): question, answer,
  paraphrased_answer, paraphrased_question, perturbed_answer (5 wrong answers): what the truth
  ratio needs.
- holdout01|05|10: question, answer. Held-out rows.
- real_authors_perturbed, world_facts_perturbed: question, answer, perturbed_answer (3): the
  general-knowledge rows of model utility (ra_*, wf_*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sift.benchmarks.hub import read_table, require_columns, text_field
from sift.errors import SiftError

HUB = "locuslab/TOFU"
AUTHORS = 200
PER_AUTHOR = 20
FORGET_AUTHORS = {"forget01": 2, "forget05": 10, "forget10": 20}
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
QA = ("question", "answer")
PERTURBED = ("question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer")
GENERAL = ("question", "answer", "perturbed_answer")


@dataclass(frozen=True)
class Table:
    """What a config holds: its columns, what its rows are for, the first author's number and
    how many authors (None: not authors' rows)."""

    columns: tuple[str, ...]
    role: str  # "qa" | "perturbed" | "holdout" | "general"
    first_author: int | None = None
    authors: int | None = None
    prefix: str = ""


def _tables() -> dict[str, Table]:
    t: dict[str, Table] = {
        "full": Table(QA, "qa", 0, AUTHORS),
        "retain_perturbed": Table(PERTURBED, "perturbed", 0, 20),
    }
    for forget, n in FORGET_AUTHORS.items():
        t[forget] = Table(QA, "qa", AUTHORS - n, n)
        t[f"{forget}_perturbed"] = Table(PERTURBED, "perturbed", AUTHORS - n, n)
        t[RETAIN_OF[forget]] = Table(QA, "qa", 0, AUTHORS - n)
        t[HOLDOUT_OF[forget]] = Table(QA, "holdout", 0, None)
    t["real_authors_perturbed"] = Table(GENERAL, "general", prefix="ra")
    t["world_facts_perturbed"] = Table(GENERAL, "general", prefix="wf")
    return t


TABLES = _tables()


def row_id(author: int, question: int, holdout: bool = False) -> str:
    return f"tofu-{'holdout-' if holdout else ''}{author:03d}-{question:02d}"


def author_name(author: int, holdout: bool = False) -> str:
    return f"tofu-{'holdout-' if holdout else ''}author-{author:03d}"


def load(config: str, source: str = HUB) -> list[dict[str, Any]]:
    """One TOFU config as sift rows (see the module docstring for ids and owners)."""
    table = TABLES.get(config)
    if table is None:
        raise SiftError(f"TOFU has no config {config!r} sift reads: use one of {', '.join(TABLES)}")
    raw = read_table(source, config)
    where = f"{source} {config}"
    require_columns(raw, table.columns, where)
    if table.role == "general":
        return [_general_row(r, f"tofu-{table.prefix}-{i:03d}", where, i) for i, r in enumerate(raw)]
    if table.authors is not None and len(raw) != table.authors * PER_AUTHOR:
        raise SiftError(
            f"{where}: {len(raw)} rows; TOFU's {config} holds {table.authors} authors of {PER_AUTHOR} questions "
            f"({table.authors * PER_AUTHOR} rows): is this TOFU?"
        )
    if len(raw) % PER_AUTHOR:
        raise SiftError(f"{where}: {len(raw)} rows is not a whole number of authors of {PER_AUTHOR} questions")
    holdout = table.role == "holdout"
    first = table.first_author or 0
    out = []
    for i, r in enumerate(raw):
        a, q = first + i // PER_AUTHOR, i % PER_AUTHOR
        row: dict[str, Any] = {
            "id": row_id(a, q, holdout),
            "author": author_name(a, holdout),
            "prompt": text_field(r, "question", where, i),
            "completion": text_field(r, "answer", where, i),
        }
        row["answer"] = row["completion"]  # TOFU's answers are sentences: "contains" asks for all of it
        if table.role == "perturbed":
            row["paraphrased_completion"] = text_field(r, "paraphrased_answer", where, i)
            row["paraphrased_prompt"] = text_field(r, "paraphrased_question", where, i)
            row["perturbed_completions"] = _texts(r, "perturbed_answer", where, i)
        out.append(row)
    return out


def _general_row(r: dict[str, Any], rid: str, where: str, i: int) -> dict[str, Any]:
    answer = text_field(r, "answer", where, i)
    return {
        "id": rid,
        "prompt": text_field(r, "question", where, i),
        "completion": answer,
        "answers": [answer],
        "perturbed_completions": _texts(r, "perturbed_answer", where, i),
    }


def _texts(r: dict[str, Any], column: str, where: str, i: int) -> list[str]:
    v = r.get(column)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v):
        raise SiftError(f"{where} row {i + 1}: {column!r} must be a non-empty list of strings")
    return list(v)


@dataclass
class EvalSets:
    """open-unlearning's TOFU evaluation sets for one forget split (configs/eval/tofu_metrics):
    forget = <split>_perturbed, retain = retain_perturbed, ra and wf the general sets, holdout =
    holdout01|05|10."""

    forget: list[dict[str, Any]]
    retain: list[dict[str, Any]]
    ra: list[dict[str, Any]]
    wf: list[dict[str, Any]]
    holdout: list[dict[str, Any]]


def eval_sets(forget_split: str, source: str = HUB) -> EvalSets:
    if forget_split not in FORGET_AUTHORS:
        raise SiftError(f"TOFU's forget split is one of {', '.join(FORGET_AUTHORS)}, not {forget_split!r}")
    return EvalSets(
        forget=load(f"{forget_split}_perturbed", source),
        retain=load("retain_perturbed", source),
        ra=load("real_authors_perturbed", source),
        wf=load("world_facts_perturbed", source),
        holdout=load(HOLDOUT_OF[forget_split], source),
    )
