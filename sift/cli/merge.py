"""`sift merge`: the shard adapters into the served model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sift.cli.app import AsJson, Wait, _command, _emit, app
from sift.errors import SiftError


@app.command()
@_command
def merge(
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Workspace folder.")] = None,
    method: Annotated[
        Optional[str], typer.Option(help="Merge method (see --list); default: the workspace's (mean).")
    ] = None,
    scale: Annotated[
        Optional[float],
        typer.Option(
            help="task-arithmetic: served = base + scale * sum of deltas; ties: lambda, served = base + scale * disjoint mean (default 1)."
        ),
    ] = None,
    density: Annotated[
        Optional[float],
        typer.Option(help="ties only: fraction of each adapter's delta entries kept, by magnitude (default 0.2)."),
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Recompute from every adapter instead of updating the saved sums.")
    ] = False,
    list_methods: Annotated[bool, typer.Option("--list", help="List the merge methods and exit.")] = False,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Merge the shard adapters into the served model, ws/merged/ (a plain transformers folder)."""
    from sift.merge import METHODS

    if list_methods:
        rows = [m.describe() for m in METHODS.values()]
        _emit(
            {"methods": rows},
            as_json,
            lambda r: "\n".join(
                f"{m['name']:<16} exact={'yes' if m['exact'] else 'no':<3} incremental={'yes' if m['incremental'] else 'no':<3} {m['summary']}"
                for m in r["methods"]
            ),
        )
        return
    from sift.exact.forget import resume_pending_forget
    from sift.merge import get_method
    from sift.merge.driver import merge_workspace
    from sift.workspace import Workspace

    if workspace is None:
        raise SiftError("--workspace/-w is required")
    ws = Workspace(workspace)
    ws.require()
    if method is not None:
        get_method(method)
    if (scale is not None or density is not None) and method is None:
        raise SiftError("--scale and --density need --method (task-arithmetic or ties)")
    with ws.lock(wait=wait, command="merge"):
        resume_pending_forget(ws)
        if method is not None:
            get_method(method).resolve({"scale": scale, "density": density})  # refuse before any work
        result = merge_workspace(ws, method=method, scale=scale, full=full, density=density)
    _emit(
        result,
        as_json,
        lambda r: (
            f"served model {workspace / 'merged'}: {r['method']} of {r['members']} adapters "
            f"({r.get('mode', r.get('reason'))}), sha256 {r['served_sha256'][:16]}"
        ),
    )
