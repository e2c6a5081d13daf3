"""The exact path: forget, add, find, audit, verify, status."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sift.cli.app import AsJson, Wait, Ws, _command, _emit, app
from sift.errors import SiftError


@app.command()
@_command
def forget(
    workspace: Ws,
    ids: Annotated[
        Optional[str], typer.Option("--ids", help="Comma-separated ids, or '-' for one id per line on stdin.")
    ] = None,
    ids_file: Annotated[Optional[str], typer.Option(help="File with one id per line.")] = None,
    group: Annotated[
        Optional[list[str]],
        typer.Option(
            "--group",
            help="Forget every row of this person (a --group-by value, matched ignoring case, accents and "
            "punctuation, as the keys router does); repeatable.",
        ),
    ] = None,
    groups_file: Annotated[Optional[str], typer.Option(help="File with one group value per line.")] = None,
    drop: Annotated[
        bool,
        typer.Option(
            "--drop",
            help="Drop the affected shards' adapters instead of retraining them (fast; their other rows stop counting too).",
        ),
    ] = False,
    ignore_missing: Annotated[
        bool,
        typer.Option("--ignore-missing", help="Skip ids (and groups) the workspace does not hold instead of failing."),
    ] = False,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Delete rows exactly: retrain (or drop) only their shards, re-merge, log, and print a certificate.

    Name the rows by id (--ids, --ids-file) or by person (--group, --groups-file: every row whose
    group-by value matches); `sift find` shows which ids a value or a piece of text names."""
    from sift.data import parse_ids
    from sift.exact.forget import forget as do_forget
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    groups = list(group or []) + (_lines(groups_file, "groups file") if groups_file is not None else [])
    id_list = parse_ids(ids, ids_file) if (ids is not None or ids_file is not None or not groups) else []
    with ws.lock(wait=wait, command="forget"):
        cert = do_forget(ws, id_list, drop=drop, ignore_missing=ignore_missing, groups=groups)

    def human(c: dict[str, Any]) -> str:
        per_group = (
            "; rows per group: " + ", ".join(f"{g!r} {n}" for g, n in c["groups"].items()) if c.get("groups") else ""
        )
        if not c["changed"]:
            return c["message"] + per_group
        merge = c["merge"]
        served = (
            f"; served model re-merged ({merge['mode']}), sha256 {merge['served_sha256'][:16]}"
            if merge
            else "; no served model yet"
        )
        return (
            f"forgot {c['rows_removed']} row(s): retrained shards {c['shards_retrained']}, dropped {c['shards_dropped']}, "
            f"emptied {c['shards_emptied']}{served} in {c['seconds']:.1f}s{per_group}"
        )

    _emit(cert, as_json, human)


def _lines(path: str, what: str) -> list[str]:
    """Non-empty lines of a file, blanks around them stripped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SiftError(f"cannot read {what} {path}: {exc.strerror}") from None
    values = [line.strip() for line in text.split("\n") if line.strip()]
    if not values:
        raise SiftError(f"{what} {path} is empty")
    return values


@app.command()
@_command
def add(
    workspace: Ws,
    data: Annotated[
        str,
        typer.Option(
            help="The new rows: .jsonl/.csv/.parquet, '-' for JSONL on stdin, or a dataset name; the same "
            "columns as the workspace's rows."
        ),
    ],
    readmit: Annotated[
        bool,
        typer.Option(
            "--readmit",
            help="Accept rows (or people) forgotten earlier: only when their owner agreed to their use again. "
            "The ledger records the readmission.",
        ),
    ] = False,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Add rows exactly: each goes to the shard its key hashes to, only those shards retrain (from
    the first changed SISA slice), and the served model is re-merged; the result equals a
    from-scratch build on all the rows, byte for byte. Ids the workspace holds and rows forgotten
    earlier are refused, with nothing changed. Running the same add again is a no-op."""
    from sift.exact.add import add as do_add
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    with ws.lock(wait=wait, command="add"):
        cert = do_add(ws, data, readmit=readmit)

    def human(c: dict[str, Any]) -> str:
        if not c["changed"]:
            return c["message"]
        merge = c["merge"]
        served = (
            f"; served model re-merged ({merge['mode']}), sha256 {merge['served_sha256'][:16]}"
            if merge
            else "; no served model yet"
        )
        kept = f"; dropped shards kept dropped: {c['shards_dropped_kept']}" if c["shards_dropped_kept"] else ""
        back = (
            f"; readmitted {c['readmitted_rows']} row(s), {c['readmitted_groups']} group(s)"
            if c["readmitted_rows"] or c["readmitted_groups"]
            else ""
        )
        return (
            f"added {c['rows_added']} row(s): trained shards {c['shards_trained']}, retrained {c['shards_retrained']}"
            f"{kept}{back}{served} in {c['seconds']:.1f}s"
        )

    _emit(cert, as_json, human)


@app.command()
@_command
def find(
    workspace: Ws,
    group: Annotated[
        Optional[list[str]],
        typer.Option(
            "--group", help="Rows of this person (a --group-by value, matched as the keys router matches); repeatable."
        ),
    ] = None,
    text: Annotated[
        Optional[list[str]],
        typer.Option(
            "--text", help="Rows with this text in any of their fields (case-insensitive substring); repeatable."
        ),
    ] = None,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Print the ids of the rows a deletion request names, one per line (read-only), e.g.
    `sift find -w ws --text alice@example.com | sift forget -w ws --ids -`. Rows matching any
    given value are listed; exit 1 when none matches (as grep)."""
    from sift.workspace import Workspace
    from sift.workspace.find import find_rows
    from sift.workspace.view import WorkspaceView

    ws = Workspace(workspace)
    ws.require()
    with ws.lock(exclusive=False, wait=wait, command="find"):
        result = find_rows(WorkspaceView.load(ws), list(group or []), list(text or [])).as_dict()
    if as_json:
        _emit(result, True, lambda r: "")
    elif result["ids"]:
        typer.echo("\n".join(result["ids"]))
    if not result["ids"]:
        raise typer.Exit(1)


@app.command()
@_command
def audit(
    workspace: Ws,
    data: Annotated[
        Optional[str],
        typer.Option(
            help="Your copy of the original rows (.jsonl/.csv/.parquet): the forgotten rows' text and tokens are taken from it. Without it only ids are searched."
        ),
    ] = None,
    ids: Annotated[
        Optional[str],
        typer.Option(
            "--ids",
            help="Look for these forgotten ids only (comma-separated, or '-' for one per line on stdin); default: every id the ledger lists.",
        ),
    ] = None,
    ids_file: Annotated[Optional[str], typer.Option(help="File with one id per line.")] = None,
    caches: Annotated[
        bool,
        typer.Option(
            "--caches/--no-caches",
            help="Also search sift's, datasets' and the hub's cache folders (their weight files left out).",
        ),
    ] = True,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Search every file of the workspace (rows, manifest, adapters, slice checkpoints, router
    files, merge sums, logs, staging leftovers) and your cache folders for the forgotten rows:
    their ids, their training text and their token ids (int64, int32, JSON). Also checks the
    ledger's hash chain, that no forget is half done and that no given id is still held.
    Exit 0 when clean, 1 on any finding (printed with the file and the row's id)."""
    from sift.data import parse_ids
    from sift.exact.audit import audit as do_audit
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    id_list = parse_ids(ids, ids_file) if (ids is not None or ids_file is not None) else None
    if data is None and not id_list:
        raise SiftError("give --data (your copy of the rows, to search for their text and tokens) or --ids (ids only)")
    with ws.lock(exclusive=False, wait=wait, command="audit"):
        report = do_audit(ws, data=data, ids=id_list, caches=caches).as_dict()

    def human(r: dict[str, Any]) -> str:
        head = (
            f"{'clean' if r['clean'] else 'FOUND'}: {r['rows_searched']} forgotten row(s), {r['needles']} patterns, "
            f"{r['files_searched']} files ({r['bytes_searched'] / 1e6:.1f} MB) in {r['seconds']:.1f}s"
        )
        lines = [head] + [f"  problem: {p}" for p in r["problems"]]
        lines += [f"  {f['file']}: row {f['row']!r} ({f['kind']}) at byte {f['offset']}" for f in r["findings"][:50]]
        if len(r["findings"]) > 50:
            lines.append(f"  ... and {len(r['findings']) - 50} more (--json lists all)")
        return "\n".join(lines)

    _emit(report, as_json, human)
    if not report["clean"]:
        raise typer.Exit(1)


@app.command()
@_command
def verify(
    workspace: Ws,
    tmp_dir: Annotated[
        Optional[str],
        typer.Option(
            help="Where to rebuild (default: the system temp folder; under a launcher, a hidden folder "
            "inside the workspace, which every rank must see)."
        ),
    ] = None,
    changed: Annotated[
        bool,
        typer.Option(
            "--changed",
            help="Rebuild only the shards whose rows, config or files changed since the last verify that "
            "passed; hash-check the others against its record; merge all from scratch and compare.",
        ),
    ] = False,
    sample: Annotated[
        int,
        typer.Option(
            "--sample", min=0, help="With --changed: also rebuild this many untouched shards, drawn with --seed."
        ),
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --sample draw.")] = 0,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Rebuild from scratch on the remaining data and compare the served weights byte for byte.
    Exit 0 only if identical, 1 otherwise. A passing verify records what it proved (verified.json),
    so that `--changed` later costs what the changes since cost.

    Under torchrun, `accelerate launch` or srun every rank rebuilds its share of the shards
    into one shared rebuild and rank 0 merges, compares and prints the result; the other ranks
    print what they rebuilt and exit 0."""
    from sift.exact.verify import verify as do_verify
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    with ws.lock(exclusive=False, wait=wait, command="verify"):
        if ws.change_pending():
            raise SiftError(
                "an interrupted forget or add is pending; run `sift merge` (or the same command again) to finish it first"
            )
        result = do_verify(ws, tmp_dir=tmp_dir, changed=changed or sample > 0, sample=sample, seed=seed)
    if "identical" not in result:  # a rank other than 0 of a launch: rank 0 compares
        _emit(
            result,
            as_json,
            lambda r: f"verify rank {r['rank']} of {r['world_size']}: rebuilt shards {r['rebuilt']}; rank 0 compares",
        )
        return
    _emit(
        result,
        as_json,
        lambda r: (
            f"identical: {'yes' if r['identical'] else 'NO'} ({r['tensors']} tensors, {r['adapters_compared']} adapters, "
            f"{r['rows']} rows, rebuilt in {r['seconds']:.1f}s); served sha256 {r['served_sha256'][:16]}"
            + (
                f"; rebuilt shards {r['rebuilt']}, hash-checked {len(r['hash_checked'])} against the verify of {r['last_verified']}"
                if r.get("mode") == "changed"
                else ""
            )
            + (
                ""
                if r["identical"]
                else f"; differing tensors: {r['mismatched_tensors'][:5]}, adapters: {r['mismatched_adapters']}"
                + (f"; trained on another stack: {'; '.join(r['stack_differences'])}" if r["stack_differences"] else "")
            )
        ),
    )
    if not result["identical"]:
        raise typer.Exit(1)


@app.command()
@_command
def status(workspace: Ws, as_json: AsJson = False) -> None:
    """Show shards, adapters, the served model, the ledger and the stack it was trained on."""
    import dataclasses

    from sift.merge.driver import served_info
    from sift.workspace import Workspace
    from sift.workspace.view import WorkspaceView

    ws = Workspace(workspace)
    view = WorkspaceView.load(ws)
    info = served_info(ws)
    ledger = ws.read_ledger()
    shards = [
        {
            "shard": p.shard,
            "rows": len(p.rows),
            "status": p.status,
            "adapter": p.adapter_sha256,
            "dropped": p.status == "dropped",
        }
        for p in view.plans()
    ]
    result = {
        "model": view.cfg.model.name,
        "num_shards": view.num_shards,
        "rows": sum(len(r) for r in view.rows.values()),
        "router": view.cfg.router_name(),
        "train_method": view.cfg.train.method,
        "shards": shards,
        "served": None
        if info is None
        else {"method": info["method"], "members": len(info["members"]), "sha256": info["served_sha256"]},
        "forgets": sum(1 for e in ledger if "forget_id" in e),
        "adds": sum(1 for e in ledger if e.get("kind") == "add"),
        "pending_forget": ws.journal_path.exists(),
        "pending_add": ws.add_journal_path.exists(),
        "compute": dataclasses.asdict(view.cfg.compute),
        "stack": view.state.stack,  # what it was trained on (None: made before stacks were recorded)
    }

    def human(r: dict[str, Any]) -> str:
        lines = [
            f"model {r['model']}, {r['rows']} rows in {r['num_shards']} shards ({r['train_method']}), {r['forgets']} forget(s) and {r['adds']} add(s) logged, router {r['router']}"
        ]
        for s in r["shards"]:
            tag = s["adapter"][:12] if s["adapter"] and s["status"] == "current" else "-"
            lines.append(f"  shard {s['shard']:>4}: {s['rows']:>6} rows  {s['status']:<8} adapter {tag}")
        served = r["served"]
        lines.append(
            "served: none"
            if served is None
            else f"served: {served['method']} of {served['members']} adapters, sha256 {served['sha256'][:16]}"
        )
        c, st = r["compute"], r["stack"]
        lines.append(
            f"compute: device {c['device']}, {c['dtype']}, attention {c['attn']}"
            + (", gradient checkpointing" if c["gradient_checkpointing"] else "")
            + (
                f"; trained on {st['device']} ({st.get('capability')}), torch {st.get('torch')}, "
                f"transformers {st.get('transformers')}, peft {st.get('peft')}"
                if st
                else "; stack not recorded (made before stacks were)"
            )
        )
        return "\n".join(lines)

    _emit(result, as_json, human)
