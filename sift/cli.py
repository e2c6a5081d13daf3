"""The `sift` command line: parse, call the library, print. Logs and progress go to stderr,
results to stdout (JSON with --json); bad input exits 2 with one line."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

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


@app.command("builtin-data")
@_command
def builtin_data(
    people: Annotated[int, typer.Option(help="How many invented people (10 facts each).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
    split: Annotated[str, typer.Option(help="'train' (rows to fine-tune on) or 'holdout' (people never trained on).")] = "train",
) -> None:
    """Print the embedded fictitious-facts data set as JSONL on stdout."""
    from sift.builtin.facts import make_rows

    if people < 1:
        raise SiftError("--people must be at least 1")
    if split not in ("train", "holdout"):
        raise SiftError("--split must be 'train' or 'holdout'")
    out = sys.stdout
    for row in make_rows(people=people, seed=seed, split=split):
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


@app.command("train-shards")
@_command
def train_shards_cmd(
    workspace: Ws,
    data: Annotated[Optional[str], typer.Option(help="Rows: .jsonl/.csv/.parquet file, '-' for JSONL on stdin, or a Hugging Face dataset name. Needed to create the workspace.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model: 'builtin' (SmolLM2-135M-Instruct, offline), 'builtin-tiny' (tests), a hub name or a folder.")] = None,
    num_shards: Annotated[Optional[int], typer.Option(help="Number of shards S (default 8).")] = None,
    group_by: Annotated[Optional[str], typer.Option(help="Column whose value keeps rows together in one shard (e.g. owner).")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Column holding the unique row id (default 'id').")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="lora (default: one LoRA adapter per shard) or sift-masks (sign-fixed full fine-tuning of --targets; its served merge defaults to sift-masks).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="sift-masks: comma-separated layer names whose weights are fine-tuned (default down_proj).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per shard (default 10).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate (default 1e-3 for lora, 1e-4 for sift-masks).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows per step (default 8).")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank (default 16).")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (default 32).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Config seed; each shard's seed derives from it and its index.")] = None,
    slices: Annotated[Optional[int], typer.Option(help="SISA slices R (default 1): each shard trains over R cumulative slices of its rows and keeps a checkpoint after each, so a forget retrains only from the first slice that held a deleted row.")] = None,
    router: Annotated[Optional[str], typer.Option(help="Default router of the workspace: auto (keys with --group-by, else embed), keys, embed or none.")] = None,
    fallback: Annotated[Optional[str], typer.Option(help="Who answers what no shard claims: merged (default) or base.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="A sift.toml to start from (flags override it).")] = None,
    shards: Annotated[Optional[str], typer.Option(help="Train only these shards, e.g. 0-3,7 (for shell/Slurm arrays).")] = None,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Create the workspace (first run) and train one LoRA adapter per shard.

    Shards whose rows and config are unchanged are skipped, so rerunning after an interruption
    only trains what is missing."""
    from sift.config import SiftConfig, apply_overrides, load_config
    from sift.create import check_same_data, create_workspace
    from sift.forget import resume_pending_forget
    from sift.snapshot import WorkspaceView
    from sift.train import launch_rank, parse_shard_spec, rank_shards, train_shards
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    sift_masks = method == "sift-masks" or (method is None and ws.exists() and ws.load_config().train.method == "sift-masks")
    if targets is not None and not sift_masks:
        raise SiftError("--targets applies to --method sift-masks only (LoRA targets are lora.target_modules in a --config)")
    target_list = None if targets is None else [t.strip() for t in targets.split(",") if t.strip()]
    overrides = {
        ("model", "name"): model, ("shards", "num_shards"): num_shards, ("data", "group_by"): group_by,
        ("train", "method"): method, ("sift_masks", "target_modules"): target_list,
        ("data", "id_column"): id_column, ("train", "epochs"): epochs, ("sift_masks" if sift_masks else "train", "lr"): lr,
        ("train", "batch_size"): batch_size, ("lora", "r"): lora_r, ("lora", "alpha"): lora_alpha,
        ("train", "seed"): seed, ("train", "slices"): slices, ("serving", "router"): router, ("serving", "fallback"): fallback,
    }
    if not ws.exists() and data is None:
        raise SiftError(f"{workspace} is not a workspace yet: give --data to create it")
    rank, world = launch_rank()
    together = world > 1 or shards is not None  # other trainers may share the workspace
    fresh_folder = not workspace.exists()
    # Creating the workspace, or finishing an interrupted forget, needs it alone: the ranks of a
    # launch meet here (the first creates it, the others wait and check it). Trainers that share
    # an existing workspace skip this and check the settings under the shared lock.
    alone = not together or not ws.exists() or ws.journal_path.exists()
    created = None
    with ws.lock(exclusive=alone, wait=max(wait, 600.0) if world > 1 else wait, command="train-shards"):
        if not ws.exists():
            try:
                cfg = apply_overrides(load_config(config) if config else SiftConfig(), overrides)
                if cfg.train.method == "sift-masks" and cfg.merge.method == "mean":
                    cfg.merge.method = "sift-masks"  # serve what the method is for, unless told otherwise
                cfg.validate()
                created = create_workspace(ws, data, cfg)  # type: ignore[arg-type]
            except BaseException:
                if fresh_folder:  # leave no half-made folder behind a refused data set
                    shutil.rmtree(workspace, ignore_errors=True)
                raise
            print(f"sift: workspace {workspace}: {created['rows']} rows in {created['shards_with_rows']} of {cfg.shards.num_shards} shards", file=sys.stderr)
        else:
            cfg = ws.load_config()
            clash = [("--targets" if key == "target_modules" else f"--{key.replace('_', '-')}") for (section, key), value in overrides.items()
                     if value is not None and value != getattr(getattr(cfg, section), key)]
            if world > 1 and config is not None and not clash:  # a rank after the one that created it
                config = None
            if clash or config is not None:
                raise SiftError(f"workspace {workspace} exists with other settings ({', '.join(clash) or '--config'}); use a new workspace or edit its sift.toml")
            if data is not None:
                check_same_data(ws, data, cfg)
            if alone:
                resume_pending_forget(ws)
        if not together:
            summary = train_shards(ws, parse_shard_spec(shards, cfg.shards.num_shards))
    if together:  # the workspace lock shared with the other trainers, one lock per shard
        with ws.lock(exclusive=False, wait=wait, command="train-shards"):
            view = WorkspaceView.load(ws)
            mine = rank_shards(view, parse_shard_spec(shards, cfg.shards.num_shards), rank, world)
            summary = train_shards(ws, mine, view=view, shard_locks=True)
        summary.update(rank=rank, world_size=world)
    summary["created"] = created is not None
    _emit(summary, as_json, lambda s: f"trained {len(s['trained'])} shard(s) ({s['steps']} steps, {s['seconds']:.1f}s); "
          f"{len(s['unchanged'])} unchanged")


@app.command()
@_command
def merge(
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Workspace folder.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Merge method (see --list); default: the workspace's (mean).")] = None,
    scale: Annotated[Optional[float], typer.Option(help="task-arithmetic: served = base + scale * sum of deltas; ties: lambda, served = base + scale * disjoint mean (default 1).")] = None,
    density: Annotated[Optional[float], typer.Option(help="ties only: fraction of each adapter's delta entries kept, by magnitude (default 0.2).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Recompute from every adapter instead of updating the saved sums.")] = False,
    list_methods: Annotated[bool, typer.Option("--list", help="List the merge methods and exit.")] = False,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Merge the shard adapters into the served model, ws/merged/ (a plain transformers folder)."""
    from sift.merge import METHODS

    if list_methods:
        rows = [m.describe() for m in METHODS.values()]
        _emit({"methods": rows}, as_json, lambda r: "\n".join(
            f"{m['name']:<16} exact={'yes' if m['exact'] else 'no':<3} incremental={'yes' if m['incremental'] else 'no':<3} {m['summary']}" for m in r["methods"]))
        return
    from sift.forget import resume_pending_forget
    from sift.merge import get_method
    from sift.serve import merge_workspace
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
    _emit(result, as_json, lambda r: f"served model {workspace / 'merged'}: {r['method']} of {r['members']} adapters "
          f"({r.get('mode', r.get('reason'))}), sha256 {r['served_sha256'][:16]}")


def _read_prompts(prompts: list[str]) -> list[str]:
    if prompts == ["-"]:
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts:
        raise SiftError("no prompt given")
    return prompts


RouterOpt = Annotated[Optional[str], typer.Option("--router", help="Router for this request: keys (group values named in the prompt) or embed (nearest prompts of each shard, by the frozen base). Default: the workspace's (serving.router).")]


@app.command()
@_command
def generate(
    prompts: Annotated[list[str], typer.Argument(help="Questions to ask; '-' reads one per line from stdin.")],
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Workspace whose served model answers.")] = None,
    model_dir: Annotated[Optional[Path], typer.Option(help="Any served model folder instead of a workspace's.")] = None,
    router: RouterOpt = None,
    merged: Annotated[bool, typer.Option("--merged", help="Answer with the merged model, without routing.")] = False,
    group: Annotated[Optional[str], typer.Option(help="Answer with the adapter of the shard that holds this group (e.g. an owner).")] = None,
    shard: Annotated[Optional[int], typer.Option(help="Answer with this shard's own adapter.")] = None,
    fallback: Annotated[Optional[str], typer.Option(help="Who answers what no shard claims: merged or base (default: the workspace's serving.fallback, merged).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 48,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout: {answers: [{prompt, answer, served_by: {path, shard, router}, score}]}, plus answer and served_by at the top for a single prompt.")] = False,
    wait: Annotated[float, typer.Option("--wait", help="Routed answers: seconds to wait while a merge or forget runs (--merged never waits: the served folder is swapped in whole).")] = 0.0,
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
        _emit_answers([{"prompt": p, "answer": a, "served_by": {"path": "model-dir", "shard": None, "router": None}, "score": None}
                       for p, a in zip(prompts, answers)], as_json)
        return
    if merged and (group is not None or shard is not None or router is not None or fallback is not None):
        raise SiftError("--merged answers without routing: leave out --router, --group, --shard and --fallback")
    ws = Workspace(workspace)  # type: ignore[arg-type]
    ws.require()
    # --merged reads only the served folder, which writers swap in whole: it needs no lock and is
    # never blocked by a running merge or forget. Routed answers read adapters and rows, so they
    # wait for a writer (--wait) or say in one line that one is running.
    with contextlib.nullcontext() if merged else ws.lock(exclusive=False, wait=wait, command="generate"):
        answers = WorkspaceServer(ws).answer(prompts, router=router, merged=merged, shard=shard, group=group,
                                             max_new_tokens=max_new_tokens, fallback=fallback)
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
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per prompt: {prompt, shard, router, score}.")] = False,
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
        _emit(decision_dict(p, d), as_json, lambda r: "\t".join(
            ["-" if r["shard"] is None else str(r["shard"]), r["router"], "-" if r["score"] is None else f"{r['score']:.4f}", r["prompt"]]))


@app.command()
@_command
def forget(
    workspace: Ws,
    ids: Annotated[Optional[str], typer.Option("--ids", help="Comma-separated ids, or '-' for one id per line on stdin.")] = None,
    ids_file: Annotated[Optional[str], typer.Option(help="File with one id per line.")] = None,
    drop: Annotated[bool, typer.Option("--drop", help="Drop the affected shards' adapters instead of retraining them (fast; their other rows stop counting too).")] = False,
    ignore_missing: Annotated[bool, typer.Option("--ignore-missing", help="Skip ids the workspace does not hold instead of failing.")] = False,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Delete rows exactly: retrain (or drop) only their shards, re-merge, log, and print a certificate."""
    from sift.data import parse_ids
    from sift.forget import forget as do_forget
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
        served = f"; served model re-merged ({merge['mode']}), sha256 {merge['served_sha256'][:16]}" if merge else "; no served model yet"
        return (f"forgot {c['rows_removed']} row(s): retrained shards {c['shards_retrained']}, dropped {c['shards_dropped']}, "
                f"emptied {c['shards_emptied']}{served} in {c['seconds']:.1f}s")

    _emit(cert, as_json, human)


@app.command()
@_command
def unlearn(
    workspace: Ws,
    method: Annotated[str, typer.Option("--method", help="ga | graddiff | npo | simnpo | ngdiff | l1sparse (see the README for each loss).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the unlearned adapter (peft format + sift-unlearn.json), outside the workspace.")],
    ids: Annotated[Optional[str], typer.Option("--ids", help="Comma-separated ids of the rows to unlearn, or '-' for one per line on stdin.")] = None,
    ids_file: Annotated[Optional[str], typer.Option(help="File with one id per line.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the forget rows.")] = 5,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (ngdiff: GeN's starting step size).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Forget rows (and retain rows) per step.")] = 8,
    beta: Annotated[Optional[float], typer.Option(help="npo: inverse temperature (default 0.1); simnpo: (default 4.5).")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="simnpo: reward margin (default 0).")] = None,
    forget_weight: Annotated[Optional[float], typer.Option(help="graddiff: weight of the forget ascent (default 1); simnpo: forget coefficient (default 0.125).")] = None,
    retain_weight: Annotated[Optional[float], typer.Option(help="graddiff, simnpo: weight of the retain NLL (default 1); npo: 0 (plain NPO), > 0 adds the retain term.")] = None,
    gen_every: Annotated[int, typer.Option(help="ngdiff: refit GeN's learning rate every this many steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the forget order and the retain batches.")] = 0,
    mask: Annotated[Optional[str], typer.Option(help="Move only the top --mask-ratio of the weights by this score: wagle (weight attribution, Jia et al. NeurIPS 2024), magnitude or random (its controls).")] = None,
    mask_ratio: Annotated[Optional[float], typer.Option(help="Fraction of the weights that --mask lets move (default 0.8).")] = None,
    sam: Annotated[Optional[float], typer.Option("--sam", help="Sharpness-aware unlearning: smooth the forget loss over an L2 ball of radius RHO (e.g. 0.01; Fan et al. 2025).")] = None,
    l1: Annotated[Optional[float], typer.Option(help="Add gamma_e * ||theta||_1, gamma decaying linearly over the epochs (l1sparse: default 1e-4).")] = None,
    prune: Annotated[Optional[float], typer.Option(help="Prune first: zero this fraction of the adapter's weights by magnitude and keep them zero (Jia et al. NeurIPS 2023).")] = None,
    coreset: Annotated[Optional[float], typer.Option(help="Unlearn with a random FRACTION of the forget rows only (the coreset effect); evaluate on all of them.")] = None,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """APPROXIMATE unlearning baseline: tune the model trained on all rows away from the forget rows.

    Not an exact forget: the workspace keeps the rows, its served model and ledger are untouched.
    Compare it with `sift forget` (exact)."""
    from sift.data import parse_ids
    from sift.unlearn.run import UnlearnSettings, unlearn as do_unlearn
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    settings = UnlearnSettings(method=method, epochs=epochs, lr=lr, batch_size=batch_size, beta=beta, gamma=gamma,
                               forget_weight=forget_weight, retain_weight=retain_weight, gen_every=gen_every, seed=seed,
                               mask=mask, mask_ratio=mask_ratio, sam_rho=sam, l1=l1, prune=prune, coreset=coreset)
    settings.resolved()  # refuse bad values before reading ids or loading anything
    id_list = parse_ids(ids, ids_file)
    with ws.lock(wait=wait, command="unlearn"):  # it may train and cache the monolithic adapter
        record = do_unlearn(ws, id_list, out, settings)
    _emit(record, as_json, lambda r: f"APPROXIMATE unlearning ({r['method']}, {r['steps']} steps, {r['seconds']:.1f}s) of "
          f"{r['forget_rows']} row(s) written to {r['out']}; not an exact forget: use `sift forget` for that")


@app.command()
@_command
def serve(
    workspace: Ws,
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    router: Annotated[Optional[str], typer.Option("--router", help="Default router of the server: keys or embed (default: the workspace's serving.router); a request's sift_router wins.")] = None,
    fallback: Annotated[Optional[str], typer.Option(help="Who answers what no shard claims: merged or base (default: the workspace's serving.fallback); a request's sift_fallback wins.")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Model id of routed serving in /v1/models (default: the workspace folder's name).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Answer length, in tokens, when a request gives no max_tokens.")] = 48,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for (more is refused with 400).")] = 256,
    wait: Wait = 0.0,
) -> None:
    """Serve the workspace over HTTP with an OpenAI-compatible API: /v1/completions,
    /v1/chat/completions, /v1/models. Requests are routed as `sift generate` routes them; a
    forget on the workspace is picked up before any request accepted after its certificate."""
    import uvicorn

    from sift.http.app import create_app
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    application = create_app(ws, model_name=model_name, router=router, fallback=fallback, default_max_tokens=max_tokens,
                             max_tokens_limit=max_tokens_limit, startup_wait=wait)
    name = application.state.settings.name
    print(f"sift: serving {workspace} as model {name!r} at http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(application, host=host, port=port, log_level="warning")
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on; stopping is the normal end
        pass


def _eval_help() -> str:
    from sift.evaluation.run import metrics_help

    return ("Evaluate one model against a retain reference, with open-unlearning's metric names and definitions.\n\n"
            "MODEL: a workspace (its routed serving; --merged for its merged model), a served folder, a peft adapter "
            "folder (e.g. a `sift unlearn` output) or a model name (the untrained base).\n\n"
            "Metrics (direction; formula):\n\n" + metrics_help().replace("\n", "\n\n"))


@app.command("eval", help=_eval_help())
@_command
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Workspace, served folder, peft adapter folder or model name.")],
    data: Annotated[Path, typer.Option("--data", help="The rows (JSONL) the model was trained on.")],
    forget_ids: Annotated[Optional[str], typer.Option("--forget-ids", help="Comma-separated forget ids, or '-' for one per line on stdin.")] = None,
    forget_ids_file: Annotated[Optional[str], typer.Option(help="File with one forget id per line.")] = None,
    holdout: Annotated[Optional[Path], typer.Option(help="Rows of people never trained on (JSONL), for membership inference: `sift builtin-data --split holdout`.")] = None,
    reference: Annotated[Optional[str], typer.Option(help="The retain reference: a model trained without the forget rows (any MODEL form), or the JSON a `sift eval --out` of it saved.")] = None,
    no_reference: Annotated[bool, typer.Option("--no-reference", help="Leave out forget_quality and privleak (they need the reference).")] = False,
    merged: Annotated[bool, typer.Option("--merged", help="A workspace: evaluate its merged model instead of its routed serving.")] = False,
    router: Annotated[Optional[str], typer.Option(help="A workspace: the router (keys | embed; default: the workspace's).")] = None,
    fallback: Annotated[Optional[str], typer.Option(help="A workspace: who answers what no shard claims (merged | base).")] = None,
    base_model: Annotated[Optional[str], typer.Option("--model", help="Base model of a peft adapter that does not name one.")] = None,
    general: Annotated[bool, typer.Option("--general/--no-general", help="Score the builtin general-knowledge questions (the wf_* metrics of model_utility).")] = True,
    retain_sample: Annotated[Optional[int], typer.Option(help="Score only this many retain rows (a fixed choice by id hash).")] = None,
    general_sample: Annotated[Optional[int], typer.Option(help="Score only this many general questions (a fixed choice by id hash).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length limit for ROUGE and recall.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
    out: Annotated[Optional[Path], typer.Option("--out", help="Also save the full result (per-row values included) to this JSON file; usable as a later --reference.")] = None,
    as_json: AsJson = False,
) -> None:
    from sift.builtin.general import general_eval_rows
    from sift.data import parse_ids
    from sift.evaluation.run import EvalSettings, evaluate, metric_table, read_rows, sample_general, split_rows
    from sift.evaluation.targets import open_target
    from sift.fsio import atomic_write_json

    if reference is not None and no_reference:
        raise SiftError("give --reference or --no-reference, not both")
    if reference is None and not no_reference:
        raise SiftError("forget_quality and privleak compare with the retain reference (a model trained without the forget rows): "
                        "pass --reference MODEL or a saved eval JSON of it, or --no-reference to leave both out")
    settings = EvalSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, retain_sample=retain_sample, general_sample=general_sample)
    settings.check()
    rows = read_rows(data)
    forget, retain = split_rows(rows, parse_ids(forget_ids, forget_ids_file), retain_sample)
    if holdout is None:
        raise SiftError("membership inference needs --holdout (rows of people never trained on; "
                        "`sift builtin-data --split holdout --people 2 > holdout.jsonl` for the builtin data)")
    held = read_rows(holdout)
    overlap = {r["id"] for r in held} & {r["id"] for r in rows}
    if overlap:
        raise SiftError(f"{len(overlap)} held-out id(s) are also in --data (e.g. {sorted(overlap)[0]!r}); held-out rows must be unseen")
    gen_rows = sample_general(general_eval_rows(), general_sample) if general else []
    ref_result = None
    if reference is not None:
        ref_path = Path(reference)
        if ref_path.is_file() and ref_path.suffix == ".json":
            try:
                ref_result = json.loads(ref_path.read_text())
            except json.JSONDecodeError as exc:
                raise SiftError(f"{reference}: not JSON ({exc.msg})") from None
            if not isinstance(ref_result, dict) or "per_row" not in ref_result or "metrics" not in ref_result:
                raise SiftError(f"{reference} is not a saved `sift eval` result")
        else:
            ref_result = evaluate(open_target(reference, base_name=base_model), forget, retain, gen_rows, held, None, settings, require_reference=False)
    target = open_target(model, merged=merged, router=router, fallback=fallback, base_name=base_model)
    result = evaluate(target, forget, retain, gen_rows, held, ref_result, settings, require_reference=not no_reference)
    if ref_result is not None:
        result["reference_metrics"] = ref_result["metrics"]
    if out is not None:
        atomic_write_json(out, result)
    summary = {k: v for k, v in result.items() if k != "per_row"}
    names = ["forget_quality", "model_utility", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_exact",
             "retain_Q_A_Prob", "retain_Q_A_ROUGE", "wf_correct", "mia_min_k", "privleak"]

    def human(r: dict[str, Any]) -> str:
        rows_ = [r] + ([{"model": f"reference: {r['reference']}", "metrics": r["reference_metrics"]}] if r.get("reference_metrics") else [])
        shown = [n for n in names if any(n in x["metrics"] for x in rows_)]
        fq = r.get("forget_quality")
        tail = f"\nforget_quality: p = {fq['p']:.3g} (log10 {fq['log10_p']:.2f}), n = {fq['n']}" if fq else "\n(no reference: forget_quality and privleak left out)"
        return metric_table(rows_, shown) + tail + ("\nAPPROXIMATE unlearning output" if r.get("approximate") else "")

    _emit(summary, as_json, human)


@app.command("compare")
@_command
def compare_cmd(
    data: Annotated[Path, typer.Option("--data", help="The rows (JSONL).")],
    out: Annotated[Path, typer.Option("--out", help="New folder for the report (table.md, results.json, tradeoff.png, cost.png) and its work/.")],
    forget_ids: Annotated[Optional[str], typer.Option("--forget-ids", help="Comma-separated forget ids, or '-' for one per line on stdin.")] = None,
    forget_ids_file: Annotated[Optional[str], typer.Option(help="File with one forget id per line.")] = None,
    holdout: Annotated[Optional[Path], typer.Option(help="Rows of people never trained on (JSONL), for membership inference.")] = None,
    model: Annotated[str, typer.Option("--model", help="Base model: 'builtin' or a Hugging Face name / local folder.")] = "builtin",
    num_shards: Annotated[int, typer.Option(help="Shards of the exact path.")] = 8,
    group_by: Annotated[Optional[str], typer.Option(help="Column that keeps rows together in one shard (e.g. owner); 'none' to shard by id.")] = "owner",
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs of every model (default: sift's recipe, 10).")] = None,
    methods: Annotated[str, typer.Option(help="Approximate baselines, comma-separated.")] = "ga,graddiff,npo,simnpo,ngdiff",
    unlearn_epochs: Annotated[int, typer.Option(help="Unlearning epochs of each baseline (each is evaluated after every epoch).")] = 3,
    unlearn_lr: Annotated[float, typer.Option(help="Baselines' learning rate (ngdiff: GeN's start).")] = 1e-4,
    seeds: Annotated[int, typer.Option(help="Also compute the NeurIPS 2023 challenge's forgetting score with N seeded models per side (0: off; costly: about 4N monolithic and 3N sharded trainings).")] = 0,
    retain_sample: Annotated[Optional[int], typer.Option(help="Retain rows scored for utility (a fixed choice by id hash).")] = 15,
    general_sample: Annotated[Optional[int], typer.Option(help="General-knowledge questions scored (a fixed choice by id hash; 0: none).")] = 15,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length limit for ROUGE and recall (open-unlearning: 200; the builtin answers are one sentence of under 30 tokens, so 48 keeps the run short).")] = 48,
    sharded_original: Annotated[bool, typer.Option("--sharded-original", help="Also evaluate the sharded workspace before the forget (the monolithic original is always evaluated).")] = False,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass in evaluation.")] = 16,
    variant: Annotated[Optional[list[str]], typer.Option("--variant", help="Another approximate run, 'method:key=value,...' (keys sam, mask, mask_ratio, l1, prune, coreset, beta, gamma, forget_weight, retain_weight), e.g. 'npo:sam=0.01', 'graddiff:mask=wagle,mask_ratio=0.8', 'l1sparse'. Repeat for more.")] = None,
    relearn: Annotated[bool, typer.Option("--relearn", help="Relearning attack on the originals, references, exact path (routed: each question's serving model; and merged) and each approximate run's last epoch: a fresh LoRA fine-tuned on half the forget rows, recall measured on the other half.")] = False,
    relearn_epochs: Annotated[int, typer.Option(help="Relearning attack: passes over its half of the forget rows.")] = 5,
    relearn_lr: Annotated[float, typer.Option(help="Relearning attack: AdamW learning rate (1e-3: the LoRA fine-tuning's own).")] = 1e-3,
    forget_set: Annotated[str, typer.Option(help="ids (--forget-ids), random or worst-case: choose --size rows (worst-case: the bi-level search of Fan et al., ECCV 2024, on the monolithic model).")] = "ids",
    size: Annotated[Optional[int], typer.Option(help="Rows to forget with --forget-set random|worst-case.")] = None,
    as_json: AsJson = False,
) -> None:
    """Exact forgetting beside every approximate baseline, against retrained references; writes a report.

    Runs on one data set and forget set: the sharded workspace and `sift forget` (exact, served routed
    and merged), each `sift unlearn` baseline from the monolithic model (evaluated after every epoch),
    and the references retrained without the forget rows (monolithic and sharded). See `sift eval --help`
    for every metric."""
    from sift.data import parse_ids
    from sift.evaluation.compare import CompareSettings, compare, report_markdown
    from sift.evaluation.relearn import RelearnSettings
    from sift.evaluation.run import EvalSettings, read_rows

    settings = CompareSettings(
        model=model, num_shards=num_shards, group_by=None if group_by in (None, "none") else group_by, epochs=epochs,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()), unlearn_epochs=unlearn_epochs, unlearn_lr=unlearn_lr,
        seeds=seeds, sharded_original=sharded_original, eval=EvalSettings(batch_size=batch_size, max_new_tokens=max_new_tokens, retain_sample=retain_sample, general_sample=general_sample),
        variants=tuple(variant or ()), relearn=relearn, relearn_settings=RelearnSettings(epochs=relearn_epochs, lr=relearn_lr),
        forget_set=forget_set, size=size)
    settings.check()
    if holdout is None:
        raise SiftError("membership inference needs --holdout (rows of people never trained on; "
                        "`sift builtin-data --split holdout --people 2 > holdout.jsonl` for the builtin data)")
    rows, held = read_rows(data), read_rows(holdout)
    given = parse_ids(forget_ids, forget_ids_file) if (forget_ids is not None or forget_ids_file is not None) else []
    result = compare(rows, given, held, out, settings)
    _emit(result, as_json, lambda r: report_markdown(r) + f"\nreport written to {out}/ (table.md, results.json, tradeoff.png, cost.png) in {r['seconds']:.0f}s")


@app.command()
@_command
def audit(
    workspace: Ws,
    data: Annotated[Optional[str], typer.Option(help="Your copy of the original rows (.jsonl/.csv/.parquet): the forgotten rows' text and tokens are taken from it. Without it only ids are searched.")] = None,
    ids: Annotated[Optional[str], typer.Option("--ids", help="Look for these forgotten ids only (comma-separated, or '-' for one per line on stdin); default: every id the ledger lists.")] = None,
    ids_file: Annotated[Optional[str], typer.Option(help="File with one id per line.")] = None,
    caches: Annotated[bool, typer.Option("--caches/--no-caches", help="Also search sift's, datasets' and the hub's cache folders (their weight files left out).")] = True,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Search every file of the workspace (rows, manifest, adapters, slice checkpoints, router
    files, merge sums, logs, staging leftovers) and your cache folders for the forgotten rows:
    their ids, their training text and their token ids (int64, int32, JSON). Also checks the
    ledger's hash chain, that no forget is half done and that no given id is still held.
    Exit 0 when clean, 1 on any finding (printed with the file and the row's id)."""
    from sift.audit import audit as do_audit
    from sift.data import parse_ids
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    id_list = parse_ids(ids, ids_file) if (ids is not None or ids_file is not None) else None
    if data is None and not id_list:
        raise SiftError("give --data (your copy of the rows, to search for their text and tokens) or --ids (ids only)")
    with ws.lock(exclusive=False, wait=wait, command="audit"):
        report = do_audit(ws, data=data, ids=id_list, caches=caches).as_dict()

    def human(r: dict[str, Any]) -> str:
        head = (f"{'clean' if r['clean'] else 'FOUND'}: {r['rows_searched']} forgotten row(s), {r['needles']} patterns, "
                f"{r['files_searched']} files ({r['bytes_searched'] / 1e6:.1f} MB) in {r['seconds']:.1f}s")
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
    tmp_dir: Annotated[Optional[str], typer.Option(help="Where to rebuild (default: the system temp folder).")] = None,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Rebuild from scratch on the remaining data and compare the served weights byte for byte.
    Exit 0 only if identical, 1 otherwise."""
    from sift.verify import verify as do_verify
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    with ws.lock(exclusive=False, wait=wait, command="verify"):
        if ws.journal_path.exists():
            raise SiftError("an interrupted forget is pending; run `sift forget` or `sift merge` to finish it first")
        result = do_verify(ws, tmp_dir=tmp_dir)
    _emit(result, as_json, lambda r: (
        f"identical: {'yes' if r['identical'] else 'NO'} ({r['tensors']} tensors, {r['adapters_compared']} adapters, "
        f"{r['rows']} rows, rebuilt in {r['seconds']:.1f}s); served sha256 {r['served_sha256'][:16]}"
        + ("" if r["identical"] else f"; differing tensors: {r['mismatched_tensors'][:5]}, adapters: {r['mismatched_adapters']}")))
    if not result["identical"]:
        raise typer.Exit(1)


@app.command()
@_command
def status(workspace: Ws, as_json: AsJson = False) -> None:
    """Show shards, adapters, the served model and the ledger."""
    from sift.serve import served_info
    from sift.snapshot import WorkspaceView
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    view = WorkspaceView.load(ws)
    info = served_info(ws)
    shards = [{"shard": p.shard, "rows": len(p.rows), "status": p.status, "adapter": p.adapter_sha256,
               "dropped": p.status == "dropped"} for p in view.plans()]
    result = {
        "model": view.cfg.model.name, "num_shards": view.num_shards, "rows": sum(len(r) for r in view.rows.values()),
        "router": view.cfg.router_name(), "train_method": view.cfg.train.method,
        "shards": shards, "served": None if info is None else {"method": info["method"], "members": len(info["members"]), "sha256": info["served_sha256"]},
        "forgets": len(ws.read_ledger()), "pending_forget": ws.journal_path.exists(),
    }

    def human(r: dict[str, Any]) -> str:
        lines = [f"model {r['model']}, {r['rows']} rows in {r['num_shards']} shards ({r['train_method']}), {r['forgets']} forget(s) logged, router {r['router']}"]
        for s in r["shards"]:
            tag = s["adapter"][:12] if s["adapter"] and s["status"] == "current" else "-"
            lines.append(f"  shard {s['shard']:>4}: {s['rows']:>6} rows  {s['status']:<8} adapter {tag}")
        served = r["served"]
        lines.append("served: none" if served is None else f"served: {served['method']} of {served['members']} adapters, sha256 {served['sha256'][:16]}")
        return "\n".join(lines)

    _emit(result, as_json, human)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
