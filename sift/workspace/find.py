"""Which rows a deletion request names: by person (group-by value) or by a piece of text.

A request to be forgotten rarely comes with row ids: it names a person, or an e-mail address
that sits somewhere in their rows. `sift find` turns either into ids (read-only), so that
`sift find --text alice@example.com | sift forget --ids -` works in a pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sift.data import Row, normalize_text
from sift.errors import SiftError
from sift.workspace.view import WorkspaceView


def group_index(view: WorkspaceView) -> dict[str, list[str]]:
    """Normalised group value -> the ids of its rows (sorted), over the rows the workspace holds."""
    out: dict[str, list[str]] = {}
    for rows in view.rows.values():
        for r in rows:
            out.setdefault(normalize_text(r.group), []).append(r.id)
    return {g: sorted(ids) for g, ids in out.items()}


def _strings(value: Any) -> list[str]:
    """Every string inside a record's value (lists and dicts of a Parquet row included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def row_mentions(row: Row, needle: str) -> bool:
    """True when `needle` (already case-folded) is a substring of any text field of the row:
    its training text and every other string column it was given with (an e-mail address may
    sit in a column training never reads)."""
    return any(needle in s.casefold() for s in _strings(row.record))


@dataclass
class FindResult:
    ids: list[str]
    by_group: dict[str, int]  # each --group value given -> rows matched
    by_text: dict[str, int]  # each --text value given -> rows matched

    def as_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "rows": len(self.ids), "groups": self.by_group, "texts": self.by_text}


def find_rows(view: WorkspaceView, groups: Sequence[str] = (), texts: Sequence[str] = ()) -> FindResult:
    """Ids of the rows that match any of `groups` (matched as the keys router matches: case,
    accents and punctuation set aside) or contain any of `texts` (case-insensitive substring of
    any text field). Reads the workspace's rows only."""
    if not groups and not texts:
        raise SiftError("give --group VALUE or --text STRING (each repeatable)")
    if groups and view.cfg.data.group_by is None:
        raise SiftError("--group needs a workspace made with --group-by (its rows have no group values); use --text")
    found: set[str] = set()
    by_group: dict[str, int] = {}
    if groups:
        index = group_index(view)
        for g in groups:
            key = normalize_text(g)
            if not key:
                raise SiftError(f"group {g!r} is empty once case, accents and punctuation are set aside")
            hits = index.get(key, [])
            by_group[g] = len(hits)
            found.update(hits)
    by_text: dict[str, int] = {}
    rows = [r for shard_rows in view.rows.values() for r in shard_rows]
    for t in texts:
        if not t.strip():
            raise SiftError("--text must not be empty (it would match every row)")
        needle = t.casefold()
        hits = [r.id for r in rows if row_mentions(r, needle)]
        by_text[t] = len(hits)
        found.update(hits)
    return FindResult(sorted(found), by_group, by_text)
