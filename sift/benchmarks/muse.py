"""MUSE (Shi et al., 2024; `muse-bench/MUSE-News` and `muse-bench/MUSE-Books` on the hub) as sift
rows.

Tables sift reads (config/split; columns as the cards give them):
- raw/forget, raw/retain1, raw/retain2, raw/holdout and train/forget|retain1|retain2: `text`,
  one document a row. Training rows: id `muse-news-raw-forget-0007`, owner the document itself (a
  deletion request names a document; MUSE records no author).
- verbmem/forget: `prompt`, `gt` (the forget text's opening and its true continuation): VerbMem.
- knowmem/forget_qa, retain_qa (and their _icl splits, the in-context examples): `question`,
  `answer`: KnowMem on forget and retain.
- privleak/forget, retain, holdout: `text`: the Min-K% membership test behind PrivLeak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sift.benchmarks.hub import read_table, require_columns, text_field
from sift.errors import SiftError

HUBS = {"muse-news": "muse-bench/MUSE-News", "muse-books": "muse-bench/MUSE-Books"}
TEXT_TABLES = {
    "raw": ("forget", "retain1", "retain2", "holdout"),
    "train": ("forget", "retain1", "retain2"),
    "privleak": ("forget", "retain", "holdout"),
}
QA_SPLITS = ("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl")
# the MUSE retrain models' Min-K% AUCs hard-coded in MUSE's own code (constants.py), MUSE's
# orientation (forget as non-members): the reference PrivLeak uses there when no retrained
# model is given. open-unlearning's orientation is 1 - these; its own default is 0.5.
MUSE_RETRAIN_AUC = {"muse-news": 0.4772, "muse-books": 0.5393}


def load(corpus: str, part: str, source: str | None = None) -> list[dict[str, Any]]:
    """One MUSE table ("config/split", e.g. "raw/forget") of `corpus` (muse-news, muse-books)."""
    if corpus not in HUBS:
        raise SiftError(f"unknown MUSE corpus {corpus!r}: use {', '.join(HUBS)}")
    config, _, split = part.partition("/")
    src = source or HUBS[corpus]
    where = f"{src} {config}/{split}"
    if config in TEXT_TABLES and split in TEXT_TABLES[config]:
        raw = read_table(src, config, split)
        require_columns(raw, ("text",), where)
        return [
            {
                "id": f"{corpus}-{config}-{split}-{i:04d}",
                "document": f"{corpus}-{config}-{split}-{i:04d}",
                "text": text_field(r, "text", where, i),
            }
            for i, r in enumerate(raw)
        ]
    if config == "knowmem" and split in QA_SPLITS:
        raw = read_table(src, config, split)
        require_columns(raw, ("question", "answer"), where)
        return [
            {
                "id": f"{corpus}-knowmem-{split}-{i:04d}",
                "prompt": text_field(r, "question", where, i),
                "completion": text_field(r, "answer", where, i),
            }
            for i, r in enumerate(raw)
        ]
    if config == "verbmem" and split == "forget":
        raw = read_table(src, config, split)
        require_columns(raw, ("prompt", "gt"), where)
        return [
            {
                "id": f"{corpus}-verbmem-{i:04d}",
                "prompt": text_field(r, "prompt", where, i),
                "gt": text_field(r, "gt", where, i),
            }
            for i, r in enumerate(raw)
        ]
    tables = [f"{c}/{s}" for c, ss in TEXT_TABLES.items() for s in ss]
    tables += [f"knowmem/{s}" for s in QA_SPLITS] + ["verbmem/forget"]
    raise SiftError(f"MUSE has no table {part!r} sift reads: use one of {', '.join(tables)}")


@dataclass
class EvalSets:
    """What MUSE's evaluation reads (open-unlearning's configs/eval/muse_metrics)."""

    verbmem: list[dict[str, Any]]
    forget_qa: list[dict[str, Any]]
    retain_qa: list[dict[str, Any]]
    forget_icl: list[dict[str, Any]]
    retain_icl: list[dict[str, Any]]
    privleak_forget: list[dict[str, Any]]
    privleak_holdout: list[dict[str, Any]]


def eval_sets(corpus: str, source: str | None = None) -> EvalSets:
    return EvalSets(
        verbmem=load(corpus, "verbmem/forget", source),
        forget_qa=load(corpus, "knowmem/forget_qa", source),
        retain_qa=load(corpus, "knowmem/retain_qa", source),
        forget_icl=load(corpus, "knowmem/forget_qa_icl", source),
        retain_icl=load(corpus, "knowmem/retain_qa_icl", source),
        privleak_forget=load(corpus, "privleak/forget", source),
        privleak_holdout=load(corpus, "privleak/holdout", source),
    )
