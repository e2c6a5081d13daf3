"""The exact path: forget, audit, verify, status."""

from __future__ import annotations

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
    drop: Annotated[
        bool,
        typer.Option(
            "--drop",
            help="Drop the affected shards' adapters instead of retraining them (fast; their other rows stop counting too).",
        ),
    ] = False,
    ignore_missing: Annotated[
        bool, typer.Option("--ignore-missing", help="Skip ids the workspace does not hold instead of failing.")
    ] = False,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Delete rows exactly: retrain (or drop) only their shards, re-merge, log, and print a certificate."""
    from sift.data import parse_ids
    from sift.exact.forget import forget as do_forget
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    id_list = parse_ids(ids, ids_file)
    with ws.lock(wait=wait, command="forget"):
        cert = do_forget(ws, id_list, drop=drop, ignore_missing=ignore_missing)

    def human(c: dict[str, Any]) -> str:
        if not c["changed"]:
            return c["message"]
        merge = c["merge"]
        served = (
            f"; served model re-merged ({merge['mode']}), sha256 {merge['served_sha256'][:16]}"
            if merge
            else "; no served model yet"
        )
        return (
            f"forgot {c['rows_removed']} row(s): retrained shards {c['shards_retrained']}, dropped {c['shards_dropped']}, "
            f"emptied {c['shards_emptied']}{served} in {c['seconds']:.1f}s"
        )

    _emit(cert, as_json, human)


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
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Rebuild from scratch on the remaining data and compare the served weights byte for byte.
    Exit 0 only if identical, 1 otherwise.

    Under torchrun, `accelerate launch` or srun every rank rebuilds its share of the shards
    into one shared rebuild and rank 0 merges, compares and prints the result; the other ranks
    print what they rebuilt and exit 0."""
    from sift.exact.verify import verify as do_verify
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    with ws.lock(exclusive=False, wait=wait, command="verify"):
        if ws.journal_path.exists():
            raise SiftError("an interrupted forget is pending; run `sift forget` or `sift merge` to finish it first")
        result = do_verify(ws, tmp_dir=tmp_dir)
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
        "forgets": len(ws.read_ledger()),
        "pending_forget": ws.journal_path.exists(),
        "compute": dataclasses.asdict(view.cfg.compute),
        "stack": view.state.stack,  # what it was trained on (None: made before stacks were recorded)
    }

    def human(r: dict[str, Any]) -> str:
        lines = [
            f"model {r['model']}, {r['rows']} rows in {r['num_shards']} shards ({r['train_method']}), {r['forgets']} forget(s) logged, router {r['router']}"
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
