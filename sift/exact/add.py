"""Exact additions: new rows go to the shards their keys hash to, only those shards retrain,
and the served model is re-merged (incrementally where the method allows). A row's shard
depends on its own key alone, so the result is the bytes a from-scratch build on all the rows
would give.

An add is journalled like a forget (keyed hashes of the new ids, never their text). A crash
before every row was written is undone by the next writing command (the rows whose keyed
hashes the journal names are taken out again: nothing changed); a crash after it is completed
(the affected shards train, the merge runs, the ledger records it). Run again with the same
rows, an add that completed is a no-op, so a pipeline may retry it.

Rows forgotten earlier (their ids' keyed hashes in the ledger), and rows of a person forgotten
with `forget --group`, come back only with `readmit`: the owner agreed to their use again; the
ledger records the readmission (keyed hashes again), and from then on they count as held.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timezone
from typing import Any

from sift.adapters import read_meta
from sift.compute import base_stack, stack_mismatch
from sift.data import Row, assign_shards, key_columns, load_records, normalize_text, parse_rows
from sift.errors import SiftError
from sift.fsio import atomic_write_json, remove_tree
from sift.hashing import keyed_group_hash, keyed_id_hash
from sift.logs import get_logger, quieted
from sift.merge import get_method
from sift.merge.driver import merge_workspace, served_info
from sift.models import LazyBase
from sift.train import train_shards
from sift.workspace import Workspace
from sift.workspace.rows import write_workspace_rows
from sift.workspace.view import WorkspaceView

log = get_logger(__name__)

ROWS, TRAIN = "rows", "train"  # an add's phases: its rows being written, then its shards trained


def add(
    ws: Workspace,
    source: str,
    readmit: bool = False,
    base: LazyBase | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Add the rows of `source` (a file, `-` for JSONL on stdin, or a dataset name) to `ws`;
    returns the certificate. Refused before anything changes: ids the workspace holds, rows whose
    columns differ from the workspace's, and (without `readmit`) rows or people forgotten earlier."""
    with quieted(quiet):
        return _add(ws, source, readmit, base)


def _add(ws: Workspace, source: str, readmit: bool, base: LazyBase | None) -> dict[str, Any]:
    from sift.exact.forget import resume_pending_forget

    started = time.perf_counter()
    cfg = ws.load_config()
    rows = parse_rows(load_records(source, key_columns=key_columns(cfg.data)), cfg.data, source=source)
    salt = bytes.fromhex(ws.load_state().ledger_salt)
    hashes = sorted(keyed_id_hash(salt, r.id) for r in rows)
    resume_pending_forget(ws, base)
    resumed = resume_pending_add(ws, base, same_as=hashes)
    if resumed is not None:  # this very add was cut short and is now complete
        resumed["seconds"] = round(time.perf_counter() - started, 3)
        return resumed

    view = WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    held = {r.id: r for shard_rows in view.rows.values() for r in shard_rows}
    clash = [r for r in rows if r.id in held]
    if clash:
        done = _added_before(ws, rows, held, hashes)
        if done is not None:
            return {
                "changed": False,
                "message": f"no-op: these {len(rows)} row(s) were added already ({done['time']})",
                "rows_added": 0,
                "ledger_entry": done["entry_sha256"],
                "seconds": round(time.perf_counter() - started, 3),
            }
        shown = ", ".join(repr(r.id) for r in clash[:5])
        raise SiftError(
            f"{source}: {len(clash)} id(s) the workspace already holds: {shown}; nothing was changed "
            "(to change a row, forget it first)"
        )
    check_schema(rows, view, source)
    entries = ws.read_ledger()
    forgotten_ids = ws.forgotten_hashes(entries)
    id_hash = {r.id: keyed_id_hash(salt, r.id) for r in rows}
    readmitted_ids = sorted(h for h in id_hash.values() if h in forgotten_ids)
    readmitted_groups: list[str] = []
    if cfg.data.group_by is not None:
        forgotten_groups = ws.forgotten_group_hashes(entries)
        readmitted_groups = sorted(
            {h for r in rows if (h := keyed_group_hash(salt, normalize_text(r.group))) in forgotten_groups}
        )
    if (readmitted_ids or readmitted_groups) and not readmit:
        what = []
        if readmitted_ids:
            back = [i for i, h in id_hash.items() if h in forgotten_ids]
            what.append(f"{len(back)} row(s) forgotten earlier (e.g. {back[0]!r})")
        if readmitted_groups:
            what.append(f"rows of {len(readmitted_groups)} {cfg.data.group_by} value(s) forgotten with --group")
        raise SiftError(
            f"{source} holds {' and '.join(what)}; nothing was changed. "
            "Add --readmit only if their owner agreed to their use again (the ledger records it)"
        )
    base = base or LazyBase.of(cfg, state)
    mismatch = stack_mismatch(ws.root, state.stack, base_stack(base, cfg.train.threads))
    if mismatch:
        raise SiftError(f"{mismatch}; nothing was changed")

    arriving = assign_shards(rows, cfg.shards.num_shards)
    journal = {
        "add_id": secrets.token_hex(8),
        "phase": ROWS,
        "id_hashes": hashes,
        "shards": sorted(arriving),
        # which of them had an adapter before: a resumed add finds some already replaced
        "had_adapters": sorted(s for s in arriving if read_meta(ws.adapter_dir(s)) is not None),
        "rows": len(rows),
        "readmitted_id_hashes": readmitted_ids,
        "readmitted_group_hashes": readmitted_groups,
        "started": _now(),
    }
    atomic_write_json(ws.add_journal_path, journal)

    # The rows, shard file by shard file, then the manifest; until the journal says TRAIN a crash
    # is undone (resume_pending_add takes out the rows its hashes name).
    merged_rows = {**view.rows}
    for shard, new in arriving.items():
        merged_rows[shard] = sorted(view.rows.get(shard, []) + new, key=lambda r: r.id)
    write_workspace_rows(ws, cfg.data, merged_rows, cfg.shards.num_shards, only=sorted(arriving))
    remove_tree(ws.unlearn_dir)  # sift unlearn's monolithic adapter did not learn the new rows
    journal["phase"] = TRAIN
    atomic_write_json(ws.add_journal_path, journal)
    cert = _complete(ws, journal, base, view.with_rows(merged_rows))
    cert["seconds"] = round(time.perf_counter() - started, 3)
    return cert


def check_schema(rows: list[Row], view: WorkspaceView, source: str) -> None:
    """New rows must look like the rows the workspace holds: the same training form (text, or
    prompt and completion) and no column the workspace's rows lack, nor one missing that all of
    them have (evaluation reads those). The first rows that differ are named by their number."""
    held = [r for shard_rows in view.rows.values() for r in shard_rows]
    if not held:
        return  # every row was forgotten: nothing to compare with
    text_form = held[0].text is not None
    columns = [_columns(r) for r in held]
    every, some = set.intersection(*columns), set.union(*columns)
    problems = []
    for n, r in enumerate(rows, 1):
        cols = _columns(r)
        if (r.text is not None) != text_form:
            want = (
                view.cfg.data.text_column
                if text_form
                else f"{view.cfg.data.prompt_column}/{view.cfg.data.completion_column}"
            )
            problems.append(f"row {n} (id {r.id!r}): trains on other columns than this workspace's rows ({want})")
        elif cols - some or every - cols:
            parts = []
            if every - cols:
                parts.append(f"missing {sorted(every - cols)}")
            if cols - some:
                parts.append(f"unknown {sorted(cols - some)}")
            problems.append(f"row {n} (id {r.id!r}): columns differ from the workspace's rows ({'; '.join(parts)})")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SiftError(f"{source}: {'; '.join(problems[:3])}{more}; nothing was changed")


def _columns(row: Row) -> set[str]:
    return {k for k, v in row.record.items() if v is not None and not (isinstance(v, float) and v != v)}


def _added_before(ws: Workspace, rows: list[Row], held: dict[str, Row], hashes: list[str]) -> dict[str, Any] | None:
    """The ledger entry of an earlier add of exactly these rows, when the workspace still holds
    them unchanged (a retried pipeline, or a rerun after a crash that came once the add had
    finished); None otherwise."""
    if any(
        r.id not in held or held[r.id].train_sha256() != r.train_sha256() or held[r.id].group != r.group for r in rows
    ):
        return None
    for entry in reversed(ws.read_ledger()):
        if entry.get("added_id_hashes") == hashes:
            return entry
    return None


def resume_pending_add(
    ws: Workspace,
    base: LazyBase | None = None,
    quiet: bool = False,
    retrain_all: bool = False,
    same_as: list[str] | None = None,
) -> dict[str, Any] | None:
    """Finish an add a crash interrupted once its rows were all written; undo one cut short
    before. Returns the certificate when the finished add's ids are `same_as` (keyed hashes):
    the caller was rerunning that very add."""
    with quieted(quiet):
        if not ws.add_journal_path.exists():
            return None
        journal = json.loads(ws.add_journal_path.read_text())
        entries = ws.read_ledger()
        done = next((e for e in entries if e.get("add_id") == journal["add_id"]), None)
        if done is not None:
            from sift.exact.forget import settle_recorded

            settle_recorded(ws, entries, ws.add_journal_path)
            return None
        view = WorkspaceView.load(ws)
        if journal["phase"] == ROWS:
            log.info(f"sift: undoing an add cut short before its rows were written ({journal['rows']} rows)")
            salt = bytes.fromhex(view.state.ledger_salt)
            new = set(journal["id_hashes"])
            rows = dict(view.rows)
            for shard in journal["shards"]:
                rows[shard] = [r for r in rows.get(shard, []) if keyed_id_hash(salt, r.id) not in new]
            write_workspace_rows(ws, view.cfg.data, rows, view.num_shards, only=journal["shards"])
            ws.add_journal_path.unlink()
            return None
        log.info(f"sift: completing an interrupted add ({journal['rows']} rows)")
        cert = _complete(ws, journal, base, view, retrain_all)
        return cert if same_as is not None and journal["id_hashes"] == same_as else None


def _complete(
    ws: Workspace, journal: dict[str, Any], base: LazyBase | None, view: WorkspaceView, retrain_all: bool = False
) -> dict[str, Any]:
    """Train the shards that received rows, re-merge, record the add in the ledger, drop the journal."""
    from sift.exact.forget import leaving_adapters, merge_summary

    cfg, state = view.cfg, view.state
    base = base or LazyBase.of(cfg, state)
    affected: list[int] = journal["shards"]
    had_served = served_info(ws) is not None
    method = get_method(cfg.merge.method)
    leaving = leaving_adapters(ws, affected) if had_served and method.incremental else None
    dropped = [s for s in affected if s in state.dropped_shards]
    train = [s for s in affected if s not in state.dropped_shards]
    steps = train_shards(ws, train, base=base, view=view, retrain_all=retrain_all)["steps"] if train else 0
    merge: dict[str, Any] | None = None
    if had_served:
        merge = merge_workspace(ws, full=method.incremental and leaving is None, base=base, removed=leaving, view=view)
    adapters = {str(s): (read_meta(ws.adapter_dir(s)) or {}).get("adapter_sha256") for s in affected}
    outcome = {
        s: "dropped" if s in dropped else ("retrained" if s in journal["had_adapters"] else "trained") for s in affected
    }
    entry = ws.append_ledger(
        {
            "kind": "add",
            "time": _now(),
            "add_id": journal["add_id"],
            "added_id_hashes": journal["id_hashes"],
            **({"readmitted_id_hashes": journal["readmitted_id_hashes"]} if journal["readmitted_id_hashes"] else {}),
            **(
                {"readmitted_group_hashes": journal["readmitted_group_hashes"]}
                if journal["readmitted_group_hashes"]
                else {}
            ),
            "rows_added": journal["rows"],
            "shards": {str(s): outcome[s] for s in affected},
            "adapters": adapters,
            "method": cfg.merge.method if had_served else None,
            "served_sha256": merge["served_sha256"] if merge else None,
        }
    )
    ws.add_journal_path.unlink(missing_ok=True)
    return {
        "changed": True,
        "rows_added": journal["rows"],
        "shards_trained": [s for s in affected if outcome[s] == "trained"],  # a shard's first rows
        "shards_retrained": [s for s in affected if outcome[s] == "retrained"],
        "shards_dropped_kept": dropped,  # dropped by an earlier `forget --drop`: their rows are kept, not served
        "steps": steps,
        "readmitted_rows": len(journal["readmitted_id_hashes"]),
        "readmitted_groups": len(journal["readmitted_group_hashes"]),
        "merge": merge_summary(merge, method),
        "routers": "rebuilt from each trained shard's own rows",
        "ledger_entry": entry["entry_sha256"],
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
