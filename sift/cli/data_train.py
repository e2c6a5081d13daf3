"""Commands that make a workspace and train it: builtin-data, train-shards."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sift.cli.app import AsJson, Wait, Ws, _command, _emit, app
from sift.errors import SiftError
from sift.logs import get_logger


@app.command("builtin-data")
@_command
def builtin_data(
    people: Annotated[int, typer.Option(help="How many invented people (10 facts each).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
    split: Annotated[
        str, typer.Option(help="'train' (rows to fine-tune on) or 'holdout' (people never trained on).")
    ] = "train",
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
    data: Annotated[
        Optional[str],
        typer.Option(
            help="Rows: .jsonl/.csv/.parquet file, '-' for JSONL on stdin, or a Hugging Face dataset name. Needed to create the workspace."
        ),
    ] = None,
    model: Annotated[
        Optional[str],
        typer.Option(
            help="Base model: 'builtin' (SmolLM2-135M-Instruct, offline), 'builtin-tiny' (tests), a hub name or a folder."
        ),
    ] = None,
    num_shards: Annotated[Optional[int], typer.Option(help="Number of shards S (default 8).")] = None,
    group_by: Annotated[
        Optional[str], typer.Option(help="Column whose value keeps rows together in one shard (e.g. owner).")
    ] = None,
    id_column: Annotated[Optional[str], typer.Option(help="Column holding the unique row id (default 'id').")] = None,
    method: Annotated[
        Optional[str],
        typer.Option(
            "--method",
            help="lora (default: one LoRA adapter per shard) or sift-masks (sign-fixed full fine-tuning of --targets; its served merge defaults to sift-masks).",
        ),
    ] = None,
    targets: Annotated[
        Optional[str],
        typer.Option(help="sift-masks: comma-separated layer names whose weights are fine-tuned (default down_proj)."),
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per shard (default 10).")] = None,
    lr: Annotated[
        Optional[float], typer.Option(help="AdamW learning rate (default 1e-3 for lora, 1e-4 for sift-masks).")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Rows per step (default 8).")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank (default 16).")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (default 32).")] = None,
    seed: Annotated[
        Optional[int], typer.Option(help="Config seed; each shard's seed derives from it and its index.")
    ] = None,
    slices: Annotated[
        Optional[int],
        typer.Option(
            help="SISA slices R (default 1): each shard trains over R cumulative slices of its rows and keeps a checkpoint after each, so a forget retrains only from the first slice that held a deleted row."
        ),
    ] = None,
    router: Annotated[
        Optional[str],
        typer.Option(
            help="Default router of the workspace: auto (keys with --group-by, else embed), keys, embed or none."
        ),
    ] = None,
    fallback: Annotated[
        Optional[str], typer.Option(help="Who answers what no shard claims: merged (default) or base.")
    ] = None,
    config: Annotated[Optional[Path], typer.Option(help="A sift.toml to start from (flags override it).")] = None,
    shards: Annotated[
        Optional[str], typer.Option(help="Train only these shards, e.g. 0-3,7 (for shell/Slurm arrays).")
    ] = None,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """Create the workspace (first run) and train one LoRA adapter per shard.

    Shards whose rows and config are unchanged are skipped, so rerunning after an interruption
    only trains what is missing."""
    from sift.config import SiftConfig, apply_overrides, load_config
    from sift.exact.forget import resume_pending_forget
    from sift.train import launch_rank, parse_shard_spec, rank_shards, train_shards
    from sift.workspace import Workspace
    from sift.workspace.create import check_same_data, create_workspace
    from sift.workspace.view import WorkspaceView

    ws = Workspace(workspace)
    sift_masks = method == "sift-masks" or (
        method is None and ws.exists() and ws.load_config().train.method == "sift-masks"
    )
    if targets is not None and not sift_masks:
        raise SiftError(
            "--targets applies to --method sift-masks only (LoRA targets are lora.target_modules in a --config)"
        )
    target_list = None if targets is None else [t.strip() for t in targets.split(",") if t.strip()]
    overrides = {
        ("model", "name"): model,
        ("shards", "num_shards"): num_shards,
        ("data", "group_by"): group_by,
        ("train", "method"): method,
        ("sift_masks", "target_modules"): target_list,
        ("data", "id_column"): id_column,
        ("train", "epochs"): epochs,
        ("sift_masks" if sift_masks else "train", "lr"): lr,
        ("train", "batch_size"): batch_size,
        ("lora", "r"): lora_r,
        ("lora", "alpha"): lora_alpha,
        ("train", "seed"): seed,
        ("train", "slices"): slices,
        ("serving", "router"): router,
        ("serving", "fallback"): fallback,
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
            get_logger("sift.cli").info(
                f"sift: workspace {workspace}: {created['rows']} rows in {created['shards_with_rows']} of {cfg.shards.num_shards} shards"
            )
        else:
            cfg = ws.load_config()
            clash = [
                ("--targets" if key == "target_modules" else f"--{key.replace('_', '-')}")
                for (section, key), value in overrides.items()
                if value is not None and value != getattr(getattr(cfg, section), key)
            ]
            if world > 1 and config is not None and not clash:  # a rank after the one that created it
                config = None
            if clash or config is not None:
                raise SiftError(
                    f"workspace {workspace} exists with other settings ({', '.join(clash) or '--config'}); use a new workspace or edit its sift.toml"
                )
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
    _emit(
        summary,
        as_json,
        lambda s: (
            f"trained {len(s['trained'])} shard(s) ({s['steps']} steps, {s['seconds']:.1f}s); "
            f"{len(s['unchanged'])} unchanged"
        ),
    )
