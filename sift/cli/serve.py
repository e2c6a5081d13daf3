"""Commands that answer: generate, route, serve (HTTP)."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sift.cli.app import Wait, Ws, _command, _emit, app
from sift.config import FALLBACKS, ROUTERS
from sift.errors import SiftError


def _read_prompts(prompts: list[str]) -> list[str]:
    if prompts == ["-"]:
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts:
        raise SiftError("no prompt given")
    return prompts


RouterOpt = Annotated[
    Optional[str],
    typer.Option(
        "--router",
        help=f"Router for this request: {' | '.join(ROUTERS)} (keys: group values named in the prompt; embed: nearest prompts of each shard, by the frozen base). Default: the workspace's (serving.router).",
    ),
]


@app.command()
@_command
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Questions to ask; '-' reads one per line from stdin.")],
    workspace: Annotated[
        Optional[Path], typer.Option("--workspace", "-w", help="Workspace whose served model answers.")
    ] = None,
    model_dir: Annotated[Optional[Path], typer.Option(help="Any served model folder instead of a workspace's.")] = None,
    router: RouterOpt = None,
    merged: Annotated[bool, typer.Option("--merged", help="Answer with the merged model, without routing.")] = False,
    group: Annotated[
        Optional[str], typer.Option(help="Answer with the adapter of the shard that holds this group (e.g. an owner).")
    ] = None,
    shard: Annotated[Optional[int], typer.Option(help="Answer with this shard's own adapter.")] = None,
    fallback: Annotated[
        Optional[str],
        typer.Option(
            help=f"Who answers what no shard claims: {' or '.join(FALLBACKS)} (default: the workspace's serving.fallback, merged)."
        ),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 48,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON object on stdout: {answers: [{prompt, answer, served_by: {path, shard, router}, score}]}, plus answer and served_by at the top for a single prompt.",
        ),
    ] = False,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            help="Routed answers: seconds to wait while a merge or forget runs (--merged never waits: the served folder is swapped in whole).",
        ),
    ] = 0.0,
) -> None:
    """Answer questions greedily. With a workspace, each request is routed to the shard that
    learned what it asks about and answered by that shard's own adapter; what no shard claims is
    answered by the merged model. The answer goes to stdout, the path that served it to stderr."""
    from sift.serving.answer import WorkspaceServer
    from sift.serving.generate import greedy_answers
    from sift.serving.load import load_served
    from sift.workspace import Workspace

    prompts = _read_prompts(prompts)
    if (workspace is None) == (model_dir is None):
        raise SiftError("give exactly one of --workspace/-w and --model-dir")
    if model_dir is not None:
        if group is not None or shard is not None or router is not None or merged or fallback is not None:
            raise SiftError("--router, --merged, --group, --shard and --fallback need --workspace")
        model, tok = load_served(model_dir)
        answers = greedy_answers(model, tok, prompts, max_new_tokens, batch_size=1)
        _emit_answers(
            [
                {
                    "prompt": p,
                    "answer": a,
                    "served_by": {"path": "model-dir", "shard": None, "router": None},
                    "score": None,
                }
                for p, a in zip(prompts, answers)
            ],
            as_json,
        )
        return
    if merged and (group is not None or shard is not None or router is not None or fallback is not None):
        raise SiftError("--merged answers without routing: leave out --router, --group, --shard and --fallback")
    ws = Workspace(workspace)  # type: ignore[arg-type]
    ws.require()
    # --merged reads only the served folder, which writers swap in whole: it needs no lock and is
    # never blocked by a running merge or forget. Routed answers read adapters and rows, so they
    # wait for a writer (--wait) or say in one line that one is running.
    with contextlib.nullcontext() if merged else ws.lock(exclusive=False, wait=wait, command="generate"):
        answers = WorkspaceServer(ws).answer(
            prompts,
            router=router,
            merged=merged,
            shard=shard,
            group=group,
            max_new_tokens=max_new_tokens,
            fallback=fallback,
        )
    for a in answers:
        print(f"sift: {_served_by_line(a.served_by())}", file=sys.stderr, flush=True)
    _emit_answers([a.to_dict() for a in answers], as_json)


def _served_by_line(by: dict[str, Any]) -> str:
    where = f"shard {by['shard']}'s adapter" if by["shard"] is not None else f"the {by['path']} model"
    why = {
        "routed": f"routed by the {by['router']} router",
        "shard": "the shard was given",
        "merged": "no shard claimed the request" if by["router"] else "asked for the merged model",
        "base": "no shard claimed the request; the workspace's fallback is the base model, or it has no merged model yet",
    }.get(by["path"], "")
    return f"answered by {where} ({why})" if why else f"answered by {where}"


def _emit_answers(answers: list[dict[str, Any]], as_json: bool) -> None:
    """Plain: one answer per line. JSON: one object {"answers": [...]}; with a single prompt it
    also carries that prompt's "answer" and "served_by" at the top."""
    result: dict[str, Any] = {"answers": answers}
    if len(answers) == 1:
        result.update(answer=answers[0]["answer"], served_by=answers[0]["served_by"])
    _emit(result, as_json, lambda r: "\n".join(a["answer"] for a in r["answers"]))


@app.command()
@_command
def route(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to route; '-' reads one per line from stdin.")],
    workspace: Ws,
    router: RouterOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per prompt: {prompt, shard, router, score}.")
    ] = False,
) -> None:
    """Print which shard would answer each prompt (no generation): shard, router, score.
    A prompt no shard claims gets shard null: the merged model would answer it."""
    from sift.serving.answer import WorkspaceServer, decision_dict
    from sift.workspace import Workspace

    prompts = _read_prompts(prompts)
    ws = Workspace(workspace)
    ws.require()
    with ws.lock(exclusive=False, command="route"):
        decisions = WorkspaceServer(ws).route(prompts, router)
    for p, d in zip(prompts, decisions):
        _emit(
            decision_dict(p, d),
            as_json,
            lambda r: "\t".join(
                [
                    "-" if r["shard"] is None else str(r["shard"]),
                    r["router"],
                    "-" if r["score"] is None else f"{r['score']:.4f}",
                    r["prompt"],
                ]
            ),
        )


def _stop_on_sigterm() -> None:
    """SIGTERM (`kill`, `docker stop`, systemd) stops the server as Ctrl-C does: in-flight work is
    failed cleanly and the HTTP server shut down, instead of the process dying mid-write."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


@app.command()
@_command
def serve(
    workspace: Ws,
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    router: Annotated[
        Optional[str],
        typer.Option(
            "--router",
            help=f"Default router of the server: {' or '.join(ROUTERS)} (default: the workspace's serving.router); a request's sift_router wins.",
        ),
    ] = None,
    fallback: Annotated[
        Optional[str],
        typer.Option(
            help=f"Who answers what no shard claims: {' or '.join(FALLBACKS)} (default: the workspace's serving.fallback); a request's sift_fallback wins."
        ),
    ] = None,
    model_name: Annotated[
        Optional[str],
        typer.Option(help="Model id of routed serving in /v1/models (default: the workspace folder's name)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Answer length, in tokens, when a request gives no max_tokens.")] = 48,
    max_tokens_limit: Annotated[
        int, typer.Option(help="Largest max_tokens a request may ask for (more is refused with 400).")
    ] = 256,
    api_key: Annotated[
        Optional[list[str]],
        typer.Option(
            "--api-key",
            envvar="SIFT_API_KEY",
            help="A key clients must send as 'Authorization: Bearer KEY' (repeatable; or SIFT_API_KEY). "
            "Without one, any client that reaches the port is served.",
        ),
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for the model at once; more are refused with 429.")
    ] = 64,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a request may wait for its turn at the model before a 503.")
    ] = 300.0,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Concurrent requests for the same model share one batched generation of up to this many rows "
            "(1: one request at a time). On by default where a probe at start finds answers alike alone and "
            "batched, bit for bit; /health says whether it is on and why.",
        ),
    ] = 16,
    upstream: Annotated[
        Optional[str],
        typer.Option(
            help="URL of an OpenAI-compatible engine that generates (vLLM with --enable-lora and runtime LoRA "
            "loading, or another sift serve): sift routes and keeps the forget guarantee, the engine serves each "
            "shard adapter under its content id shard-NNNN-<sha12>. Needs --fallback base and --upstream-model.",
        ),
    ] = None,
    upstream_model: Annotated[
        Optional[str], typer.Option(help="The name the upstream engine serves the base model under.")
    ] = None,
    upstream_key: Annotated[
        Optional[str], typer.Option(envvar="SIFT_UPSTREAM_KEY", help="Bearer key for the upstream engine.")
    ] = None,
    wait: Wait = 0.0,
) -> None:
    """Serve the workspace over HTTP with an OpenAI-compatible API: /v1/completions,
    /v1/chat/completions (both with stream: true), /v1/models, and /health. Requests are routed
    as `sift generate` routes them; a forget on the workspace is picked up before any request
    accepted after its certificate."""
    import uvicorn

    from sift.serving.http.app import create_app
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    application = create_app(
        ws,
        model_name=model_name,
        router=router,
        fallback=fallback,
        default_max_tokens=max_tokens,
        max_tokens_limit=max_tokens_limit,
        startup_wait=wait,
        api_keys=list(api_key or []),
        max_queue=max_queue,
        request_timeout=request_timeout,
        batch_size=batch_size,
        worker_thread=False,
        upstream=upstream,
        upstream_model=upstream_model,
        upstream_key=upstream_key,
    )
    name = application.state.settings.name
    print(
        f"sift: serving {workspace} as model {name!r} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)",
        file=sys.stderr,
        flush=True,
    )
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"sift: warning: serving on {host} with no API key: anyone who reaches port {port} is answered "
            "(give --api-key or SIFT_API_KEY)",
            file=sys.stderr,
            flush=True,
        )
    _stop_on_sigterm()
    batcher = getattr(application.state.gate, "batcher", None)
    if batcher is None:
        try:
            uvicorn.run(application, host=host, port=port, log_level="warning")
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on; stopping is the normal end
            pass
        return
    # batching: the model work runs on the main thread (faster matrix products there, see
    # sift.serving.http.batcher), the HTTP server on a thread of its own
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="warning"))
    stop = threading.Event()

    def serve_http() -> None:
        try:
            server.run()
        finally:
            stop.set()

    http = threading.Thread(target=serve_http, name="sift-http", daemon=True)
    http.start()
    try:
        batcher.run(stop)
    except KeyboardInterrupt:  # Ctrl-C: stop the HTTP server too; stopping is the normal end
        pass
    finally:
        server.should_exit = True
        http.join(30)
