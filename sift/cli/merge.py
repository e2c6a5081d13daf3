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
    param: Annotated[
        Optional[list[str]],
        typer.Option(
            "--param",
            help="A parameter of the method, key=value (repeatable); `sift merge --list` shows each method's. "
            "Saved as the workspace's [merge.params].",
        ),
    ] = None,
    scale: Annotated[Optional[float], typer.Option(help="Alias of --param scale=VALUE.")] = None,
    density: Annotated[Optional[float], typer.Option(help="Alias of --param density=VALUE.")] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Recompute from every adapter instead of updating the saved sums.")
    ] = False,
    served_dtype: Annotated[
        Optional[str],
        typer.Option(
            "--served-dtype",
            help="The served model's dtype: base (the base's own, default) or float32 (over a bf16/fp16 base: "
            "keeps merged entries a half-precision rounding would take back to the base's value; twice the size). "
            "Saved as the workspace's merge.served_dtype.",
        ),
    ] = None,
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
                + "".join(
                    f"\n{'':<16} --param {p['name']}=VALUE  {p['help']} (default {p['default']:g})" for p in m["params"]
                )
                for m in r["methods"]
            ),
        )
        return
    from sift.config import SERVED_DTYPES, merge_param_aliases
    from sift.exact.forget import resume_pending_change
    from sift.merge import get_method
    from sift.merge.base import parse_params
    from sift.merge.driver import merge_workspace
    from sift.workspace import Workspace

    if workspace is None:
        raise SiftError("--workspace/-w is required")
    ws = Workspace(workspace)
    ws.require()
    given = merge_param_aliases(parse_params(param), {"scale": scale, "density": density})
    if given and method is None:
        raise SiftError("merge parameters (--param, --scale, --density) need --method")
    if method is not None:
        get_method(method).resolve(given)  # refuse before any work
    if served_dtype is not None and served_dtype not in SERVED_DTYPES:
        raise SiftError(f"--served-dtype must be one of {', '.join(SERVED_DTYPES)}; got {served_dtype!r}")
    with ws.lock(wait=wait, command="merge"):
        resume_pending_change(ws)
        result = merge_workspace(ws, method=method, full=full, params=given, served_dtype=served_dtype)
    _emit(
        result,
        as_json,
        lambda r: (
            f"served model {workspace / 'merged'}: {r['method']} of {r['members']} adapters "
            f"({r.get('mode', r.get('reason'))}), sha256 {r['served_sha256'][:16]}"
            + (
                f"; {r['entries_equal_base'] / r['entries_merged']:.1%} of {r['entries_merged']} merged entries "
                "equal the base's (the mean rounded back to it)"
                if r.get("entries_merged")
                else ""
            )
        ),
    )
