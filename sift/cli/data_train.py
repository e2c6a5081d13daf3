"""Commands that make a workspace and train it: builtin-data, train-shards."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sift.cli.app import AsJson, Wait, Ws, _command, _emit, app
from sift.config import FALLBACKS, ROUTERS
from sift.errors import SiftError


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
    min_steps: Annotated[
        Optional[int],
        typer.Option(
            help="A floor on each shard's optimizer steps (default 0: none): a small shard runs whole epochs until it has taken this many. Its own row count alone decides, so forgets stay exact."
        ),
    ] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate (default 1e-3).")] = None,
    mask_density: Annotated[
        Optional[float],
        typer.Option(
            help="sift-masks: the share of each tuned weight's entries a shard keeps, its largest deltas (default 0.3; 1 keeps every entry tuning moved)."
        ),
    ] = None,
    mask_form: Annotated[
        Optional[str],
        typer.Option(
            help="sift-masks: dense (each shard stores its delta of every tuned weight, the paper's form) or lora "
            "(sift's LoRA form: a seeded frozen A shared by all shards, a sign-fixed B of --lora-r columns per shard, "
            "the mask on B; merged with sift-masks-lora[-coordinate]). Default dense."
        ),
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
            help=f"Default router of the workspace: auto (keys with --group-by, else embed), {', '.join(ROUTERS)} or none."
        ),
    ] = None,
    fallback: Annotated[
        Optional[str],
        typer.Option(help=f"Who answers what no shard claims: {' or '.join(FALLBACKS)} (default merged)."),
    ] = None,
    device: Annotated[
        Optional[str],
        typer.Option(
            help="auto (this rank's GPU if CUDA is there, else the CPU; the default), cpu, cuda or cuda:N. With --retrain-all it may move an existing workspace."
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(help="The base's dtype: float32 (default), bfloat16 or float16; adapters stay float32."),
    ] = None,
    attn: Annotated[
        Optional[str],
        typer.Option(
            help="Attention implementation: auto (default: transformers' choice, sdpa where the model has it), sdpa or eager."
        ),
    ] = None,
    gradient_checkpointing: Annotated[
        Optional[bool],
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations in the backward pass (much less memory, about a third more compute).",
        ),
    ] = None,
    retrain_all: Annotated[
        bool,
        typer.Option(
            "--retrain-all",
            help="Retrain every shard on this machine's stack and record it (a workspace trained on another GPU, CPU or library version refuses to train otherwise).",
        ),
    ] = False,
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
    from sift.exact.build import TrainSettings, train_workspace

    settings = TrainSettings(
        model=model,
        num_shards=num_shards,
        group_by=group_by,
        id_column=id_column,
        method=method,
        targets=None if targets is None else [t.strip() for t in targets.split(",") if t.strip()],
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        seed=seed,
        slices=slices,
        router=router,
        fallback=fallback,
        device=device,
        dtype=dtype,
        attn=attn,
        gradient_checkpointing=gradient_checkpointing,
        min_steps=min_steps,
        mask_density=mask_density,
        mask_form=mask_form,
    )
    summary = train_workspace(
        workspace, data, settings, config=config, shards=shards, wait=wait, retrain_all=retrain_all
    )
    _emit(
        summary,
        as_json,
        lambda s: (
            f"trained {len(s['trained'])} shard(s) ({s['steps']} steps, {s['seconds']:.1f}s); "
            f"{len(s['unchanged'])} unchanged"
        ),
    )
