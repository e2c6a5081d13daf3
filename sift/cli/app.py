"""The `sift` command line: parse, call the library, print. Logs and progress go to stderr,
results to stdout (JSON with --json); bad input exits 2 with one line."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from sift.errors import SiftError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Exact unlearning of fine-tuning data: one LoRA adapter per shard, merged exactly; "
    "`sift forget` retrains only the affected shards and `sift verify` proves the result equals "
    "a from-scratch run on the remaining data, byte for byte.",
)

Ws = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder (created by train-shards).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
Wait = Annotated[float, typer.Option("--wait", help="Seconds to wait for a busy workspace before giving up.")]


@app.callback()
def _log_level(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log lines on stderr (-v: debug).")
    ] = 0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only warnings and errors on stderr (no progress).")
    ] = False,
) -> None:
    """Set the level of sift's log (stderr): info by default, debug with -v, warnings with -q."""
    from sift.logs import configure

    configure(-1 if quiet else verbose)


def _command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn SiftError into `sift: error: ...` and exit code 2; keep tracebacks for real bugs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sift.determinism import quiet_libraries

        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except SiftError as exc:
            typer.echo(f"sift: error: {exc}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("sift: interrupted; rerun the same command to finish", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
    else:
        typer.echo(human(result))


def main() -> None:
    app()
