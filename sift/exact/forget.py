"""Exact unlearning: remove rows, retrain (or drop) only their shards, re-merge incrementally.

A forget is journalled before anything changes (the journal holds keyed hashes of the ids, never
the ids or text) and every step is idempotent, so a forget cut short by a crash is completed by
the next command that takes the workspace lock, and a forget either happened or did not.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sift.adapters import Adapter, load_adapter, read_meta
from sift.compute import base_stack, stack_mismatch
from sift.data import normalize_text
from sift.errors import SiftError
from sift.fsio import atomic_write_json, remove_tree
from sift.hashing import keyed_group_hash, keyed_id_hash
from sift.logs import get_logger, quieted
from sift.merge import get_method
from sift.merge.driver import merge_workspace, saved_sum_members, served_info
from sift.models import LazyBase
from sift.train import train_shards
from sift.workspace import Workspace
from sift.workspace.rows import read_manifest, write_workspace_rows
from sift.workspace.view import WorkspaceView

log = get_logger(__name__)


def forget(
    ws: Workspace,
    ids: list[str],
    drop: bool = False,
    ignore_missing: bool = False,
    base: LazyBase | None = None,
    quiet: bool = False,
    groups: list[str] | None = None,
) -> dict[str, Any]:
    """Forget `ids` and every row of each of `groups` (group-by values, matched as the keys
    router matches them); returns the certificate. Unknown ids or groups raise before anything
    is touched. Progress is logged; `quiet` silences it for this call."""
    with quieted(quiet):
        return _forget(ws, ids, drop, ignore_missing, base, groups or [])


def _forget(
    ws: Workspace, ids: list[str], drop: bool, ignore_missing: bool, base: LazyBase | None, groups: list[str]
) -> dict[str, Any]:
    started = time.perf_counter()
    resume_pending_change(ws, base)
    state = ws.load_state()
    salt = bytes.fromhex(state.ledger_salt)
    manifest = read_manifest(ws)
    by_group = _resolve_groups(ws, groups, salt, ignore_missing) if groups else None
    if by_group is not None:
        ids = sorted(set(ids) | {i for held in by_group.ids.values() for i in held})
    present = sorted(i for i in set(ids) if i in manifest)
    absent = sorted(i for i in set(ids) if i not in manifest)
    done_before = ws.forgotten_hashes()
    already = [i for i in absent if keyed_id_hash(salt, i) in done_before]
    unknown = [i for i in absent if keyed_id_hash(salt, i) not in done_before]
    if unknown and not ignore_missing:
        shown = ", ".join(repr(i) for i in unknown[:5])
        raise SiftError(
            f"{len(unknown)} id(s) are not in workspace {ws.root}: {shown}; nothing was changed (--ignore-missing skips them)"
        )
    group_report = {} if by_group is None else by_group.report()
    if not present:
        what = f"{len(already)} already forgotten" if already else "nothing to forget"
        if by_group is not None and by_group.already:
            what += f"; {len(by_group.already)} group(s) already forgotten"
        return {
            "changed": False,
            "message": f"no-op: {what}",
            "rows_removed": 0,
            "already_forgotten": len(already),
            "unknown_ignored": len(unknown),
            **group_report,
            "seconds": round(time.perf_counter() - started, 3),
        }
    if not drop:  # retraining on another stack would not give the bytes a from-scratch run there gives
        cfg = ws.load_config()
        trainer = base or LazyBase.of(cfg, state)
        mismatch = stack_mismatch(ws.root, state.stack, base_stack(trainer, cfg.train.threads))
        if mismatch:
            raise SiftError(f"{mismatch}; nothing was changed (--drop needs no training)")
    journal = {
        "forget_id": secrets.token_hex(8),
        "id_hashes": sorted(keyed_id_hash(salt, i) for i in present),
        "shards": sorted({manifest[i] for i in present}),
        "rows": len(present),  # a resumed forget finds the rows already gone: its record must not say 0
        "drop": drop,
        "started": _now(),
    }
    if by_group is not None and by_group.hashes:
        journal["group_hashes"] = by_group.hashes
    atomic_write_json(ws.journal_path, journal)
    cert = _complete(ws, journal, base)
    cert.update(
        already_forgotten=len(already),
        unknown_ignored=len(unknown),
        **group_report,
        seconds=round(time.perf_counter() - started, 3),
    )
    return cert


@dataclass
class _Groups:
    """The groups a forget names, resolved against the workspace's rows: each given value's ids
    (in the order given), those forgotten earlier, those unknown and skipped."""

    ids: dict[str, list[str]]
    already: list[str]
    unknown: list[str]
    hashes: list[str]  # keyed hashes of the normalised values forgotten now, for the ledger

    def report(self) -> dict[str, Any]:
        return {
            "groups": {g: len(held) for g, held in self.ids.items()},
            "groups_already_forgotten": len(self.already),
            "groups_unknown_ignored": len(self.unknown),
        }


def _resolve_groups(ws: Workspace, groups: list[str], salt: bytes, ignore_missing: bool) -> _Groups:
    from sift.workspace.find import group_index

    view = WorkspaceView.load(ws)
    if view.cfg.data.group_by is None:
        raise SiftError("--group needs a workspace made with --group-by (its rows have no group values); use --ids")
    index = group_index(view)
    forgotten = ws.forgotten_group_hashes()
    out = _Groups({}, [], [], [])
    hashes: set[str] = set()
    for given in groups:
        key = normalize_text(given)
        if not key:
            raise SiftError(f"group {given!r} is empty once case, accents and punctuation are set aside")
        if key in index:
            out.ids[given] = index[key]
            hashes.add(keyed_group_hash(salt, key))
        elif keyed_group_hash(salt, key) in forgotten:
            out.already.append(given)
        else:
            out.unknown.append(given)
    if out.unknown and not ignore_missing:
        shown = ", ".join(repr(g) for g in out.unknown[:5])
        raise SiftError(
            f"{len(out.unknown)} group(s) match no row of workspace {ws.root} ({view.cfg.data.group_by}): {shown}; "
            "nothing was changed (--ignore-missing skips them; `sift find -w WS --group VALUE` shows what matches)"
        )
    out.hashes = sorted(hashes)
    return out


def resume_pending_forget(
    ws: Workspace, base: LazyBase | None = None, quiet: bool = False, retrain_all: bool = False
) -> dict[str, Any] | None:
    """Finish a forget that a crash interrupted (called under the lock by every writing command)."""
    with quieted(quiet):
        return _resume(ws, base, retrain_all)


def _resume(ws: Workspace, base: LazyBase | None, retrain_all: bool = False) -> dict[str, Any] | None:
    if not ws.journal_path.exists():
        return None
    journal = json.loads(ws.journal_path.read_text())
    entries = ws.read_ledger()
    if any(e.get("forget_id") == journal["forget_id"] for e in entries):
        settle_recorded(ws, entries, ws.journal_path)
        return None
    log.info(f"sift: completing an interrupted forget ({len(journal['id_hashes'])} ids)")
    return _complete(ws, journal, base, retrain_all)


def _complete(
    ws: Workspace, journal: dict[str, Any], base: LazyBase | None, retrain_all: bool = False
) -> dict[str, Any]:
    view = WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    base = base or LazyBase.of(cfg, state)
    salt = bytes.fromhex(state.ledger_salt)
    doomed = set(journal["id_hashes"])
    affected: list[int] = journal["shards"]
    had_served = served_info(ws) is not None
    method = get_method(cfg.merge.method)

    # 1. An incremental method will take the old adapters out of its sums: read them now, while
    #    they are still on disk.
    leaving = leaving_adapters(ws, affected) if had_served and method.incremental else None

    # 2. Delete the rows from the workspace's data.
    rows = view.rows
    kept = {s: [r for r in rows.get(s, []) if keyed_id_hash(salt, r.id) not in doomed] for s in affected}
    removed = int(journal.get("rows", sum(len(rows.get(s, [])) - len(kept[s]) for s in affected)))
    write_workspace_rows(ws, cfg.data, {**rows, **kept}, cfg.shards.num_shards, only=affected)
    remove_tree(ws.unlearn_dir)  # sift unlearn's monolithic adapter learned the deleted rows too

    # 3. Retrain what is left of each shard, or drop it (its router files go with its folder).
    outcome: dict[int, str] = {}
    for shard in affected:
        if not kept[shard]:
            remove_tree(ws.adapter_dir(shard))
            outcome[shard] = "emptied"
        elif journal["drop"] or shard in state.dropped_shards:
            remove_tree(ws.adapter_dir(shard))
            if shard not in state.dropped_shards:
                state.dropped_shards.append(shard)
            outcome[shard] = "dropped"
    ws.save_state(state)
    view = view.with_rows({**rows, **kept})
    retrain = [s for s in affected if s not in outcome]
    steps = 0
    if retrain:
        steps = train_shards(ws, retrain, base=base, view=view, retrain_all=retrain_all)["steps"]
        outcome.update({s: "retrained" for s in retrain})

    # 4. Re-merge: one adapter's work per affected shard when the sums survived.
    merge: dict[str, Any] | None = None
    if had_served:
        merge = merge_workspace(ws, full=method.incremental and leaving is None, base=base, removed=leaving, view=view)

    # 5. Record it, then drop the journal.
    adapters = {str(s): (read_meta(ws.adapter_dir(s)) or {}).get("adapter_sha256") for s in affected}
    entry = ws.append_ledger(
        {
            "time": _now(),
            "forget_id": journal["forget_id"],
            "id_hashes": journal["id_hashes"],
            **({"group_hashes": journal["group_hashes"]} if journal.get("group_hashes") else {}),
            "rows_removed": removed,
            "shards": {str(s): outcome[s] for s in affected},
            "adapters": adapters,
            "method": cfg.merge.method if had_served else None,
            "served_sha256": merge["served_sha256"] if merge else None,
        }
    )
    ws.journal_path.unlink(missing_ok=True)
    return {
        "changed": True,
        "rows_removed": removed,
        "shards_retrained": [s for s in affected if outcome[s] == "retrained"],
        "steps": steps,  # optimizer steps of the retraining (a resumed forget counts what it ran)
        "shards_dropped": [s for s in affected if outcome[s] == "dropped"],
        "shards_emptied": [s for s in affected if outcome[s] == "emptied"],
        "merge": merge_summary(merge, method),
        "routers": "rebuilt from each retrained shard's own rows; removed with dropped or emptied shards",
        "ledger_entry": entry["entry_sha256"],
    }


def settle_recorded(ws: Workspace, entries: list[dict[str, Any]], journal_path: Path) -> None:
    """A journalled change (forget or add) whose ledger entry exists had finished; what a crash
    can have cut off is the ledger anchor's update (state.json) and the journal's removal: both
    are done here."""
    state = ws.load_state()
    if state.ledger_entries != len(entries):
        state.ledger_entries, state.ledger_head = len(entries), entries[-1]["entry_sha256"]
        ws.save_state(state)
    journal_path.unlink()


def merge_summary(merge: dict[str, Any] | None, method: Any) -> dict[str, Any] | None:
    """What a certificate says of the re-merge (None: the workspace serves no merged model yet)."""
    if merge is None:
        return None
    return {
        "mode": merge.get("mode", "unchanged"),
        "method": merge["method"],
        "exact": method.exact,
        "incremental": method.incremental,
        "served_sha256": merge["served_sha256"],
        "served_dtype": merge.get("served_dtype"),
    }


def leaving_adapters(ws: Workspace, affected: list[int]) -> list[Adapter] | None:
    """The adapters of `affected` that the served model's saved sums hold, read before a forget
    or an add replaces them (a few MB each; the sums themselves are streamed by the merge), so
    the merge takes them out and puts the new ones in. None when the sums cannot be updated
    (there are none, or a resumed command finds an adapter already replaced): the merge then
    starts over. A recomputed method (TIES) merges every remaining adapter again anyway."""
    held_by_sums = saved_sum_members(ws)
    if held_by_sums is None:
        return None
    leaving: list[Adapter] = []
    for shard in affected:
        held = held_by_sums.get(shard)
        if held is None:
            continue
        meta = read_meta(ws.adapter_dir(shard))
        if meta is None or meta.get("adapter_sha256") != held:
            return None
        leaving.append(load_adapter(ws.adapter_dir(shard), shard))
    return leaving


def resume_pending_change(
    ws: Workspace, base: LazyBase | None = None, quiet: bool = False, retrain_all: bool = False
) -> None:
    """Finish (or, for an add whose rows were not all written, undo) whatever forget or add a
    crash interrupted; called under the lock by every writing command."""
    from sift.exact.add import resume_pending_add

    resume_pending_forget(ws, base, quiet=quiet, retrain_all=retrain_all)
    resume_pending_add(ws, base, quiet=quiet, retrain_all=retrain_all)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
