"""Deterministic training of one shard (LoRA, or SIFT-Masks sign-fixed tuning), and of a
workspace's shards: same rows + same config + same base => same bytes.

No state crosses shards: each shard starts from the unchanged base (its LoRA layers are put in
and taken out again, sift.train.lora.lora_on_base), its own seed (derived from the config seed
and the shard index), its own optimizer and batch order. The
pieces live beside this module: `lora` (the LoRA model, loss and saving), `sisa` (slices),
`ranks` (shard lists and the split over ranks), `progress` (stderr).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sift.adapters import META, adapter_intact
from sift.compute import base_stack, model_stack, stack_mismatch
from sift.config import SiftConfig
from sift.data import Row
from sift.determinism import derive_seed, enable_determinism
from sift.errors import SiftError
from sift.fsio import atomic_write_json, remove_tree, replace_dir, staging_dir
from sift.logs import get_logger, progress_enabled, quieted
from sift.loop import LoopResult, LoopSettings, batches, run_loop
from sift.models import BaseModel, LazyBase, restored_on_exit
from sift.routing.routers import build_routers, router_settings, routers_current
from sift.siftmasks.store import DELTA_FILE, save_delta
from sift.siftmasks.tune import tune_sign_fixed
from sift.train.lora import (
    canonical_adapter_config,
    completion_loss,
    lora_on_base,
    save_lora,
    tokenize_rows,
    use_checkpointing,
)
from sift.train.progress import stderr_progress
from sift.train.ranks import claim_order, launch_rank, parse_shard_spec, rank_shards, steal_walk
from sift.train.sisa import SLICES_DIR, fit_lora_sliced, read_stages, slice_epochs, slice_of, stage_hash
from sift.workspace import Workspace
from sift.workspace.view import WorkspaceView

__all__ = [  # the names of this release's sift.train module, wherever they live now
    "SLICES_DIR",
    "TrainResult",
    "canonical_adapter_config",
    "claim_order",
    "completion_loss",
    "launch_rank",
    "parse_shard_spec",
    "rank_shards",
    "read_stages",
    "shard_seed",
    "slice_epochs",
    "slice_of",
    "stage_hash",
    "steal_walk",
    "stderr_progress",
    "tokenize_rows",
    "train_shard",
    "train_shards",
]

log = get_logger(__name__)


@dataclass
class TrainResult:
    shard: int
    rows: int
    steps: int
    seconds: float
    final_loss: float
    adapter_sha256: str


def shard_seed(cfg: SiftConfig, shard: int) -> int:
    return derive_seed("shard", cfg.train.seed, shard)


_batches = batches  # the old name, kept for callers


def train_shard(
    base: BaseModel,
    rows: list[Row],
    cfg: SiftConfig,
    shard: int,
    out_dir: Path,
    content_hash: str,
    progress: Callable[[int, int, float], None] | None = None,
    reuse_stages: bool = True,
) -> TrainResult:
    """Fine-tune one shard (a LoRA adapter, or a SIFT-Masks sign-fixed delta, as train.method
    says) and write it, sift-meta.json and the shard's router files to `out_dir` atomically: a
    crash leaves the previous adapter or none, never half of one. `reuse_stages` False trains
    every SISA stage again (a retrain on another stack must not keep the old stack's checkpoints)."""
    with pinned_threads(cfg.train.threads):
        return _train_shard(base, rows, cfg, shard, out_dir, content_hash, progress, reuse_stages)


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n (0: left as it is) for the duration."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_shard(
    base: BaseModel,
    rows: list[Row],
    cfg: SiftConfig,
    shard: int,
    out_dir: Path,
    content_hash: str,
    progress: Callable[[int, int, float], None] | None,
    reuse_stages: bool = True,
) -> TrainResult:
    enable_determinism()
    started = time.perf_counter()
    examples = tokenize_rows(base, rows, cfg.train.max_length)
    seed = shard_seed(cfg, shard)
    staged = staging_dir(out_dir)
    if cfg.train.slices > 1:
        previous = out_dir if reuse_stages else staged  # the empty staging folder: nothing to reuse
        digest, result, extra = fit_lora_sliced(base, rows, cfg, shard, seed, staged, previous, progress)
        tokens = extra.pop("tokens_trained")
    else:
        fit = _fit_sift_masks if cfg.train.method == "sift-masks" else _fit_lora
        digest, result, extra = fit(base, examples, cfg, seed, staged, progress)
        epochs = LoopSettings.for_training(cfg.train, examples=len(examples)).epochs  # min_steps may add some
        tokens = epochs * sum(len(ids) for ids, _ in examples)
    build_routers(base, rows, cfg, staged, content_hash)
    seconds = time.perf_counter() - started
    atomic_write_json(
        staged / META,
        {
            "shard": shard,
            "method": cfg.train.method,
            "content_hash": content_hash,
            "adapter_sha256": digest,
            "rows": len(rows),
            "steps": result.steps,
            "seed": seed,
            "final_loss": result.final_loss,
            "seconds": round(seconds, 3),
            # every epoch runs each example once: 6 N FLOPs per token (forward + backward)
            "tokens_trained": tokens,
            "flops_estimate": 6 * sum(p.numel() for p in base.model.parameters()) * tokens,
            "torch_threads": torch.get_num_threads(),
            "stack": model_stack(base.model, cfg.train.threads),  # the model as it trained
            **extra,
        },
    )
    replace_dir(staged, out_dir)
    return TrainResult(shard, len(rows), result.steps, seconds, result.final_loss, digest)


def _fit_lora(
    base: BaseModel,
    examples: list,
    cfg: SiftConfig,
    seed: int,
    staged: Path,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[str, LoopResult, dict[str, Any]]:
    """One LoRA adapter (peft), trained on the base itself and saved in peft's format."""
    t = cfg.train
    settings = LoopSettings.for_training(t, examples=len(examples))
    with lora_on_base(base, cfg, seed) as (peft_model, params):
        peft_model.train()
        lm = peft_model.base_model.model  # the causal LM, with the LoRA layers injected in place
        use_checkpointing(lm, cfg)
        result = run_loop(
            lm,
            params,
            examples,
            base.tokenizer.pad_token_id,
            settings,
            seed,
            loss_fn=lambda m, b: completion_loss(m, *b),
            progress=progress,
        )
        return save_lora(peft_model, staged), result, {}


def _fit_sift_masks(
    base: BaseModel,
    examples: list,
    cfg: SiftConfig,
    seed: int,
    staged: Path,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[str, LoopResult, dict[str, Any]]:
    """Sign-fixed full fine-tuning of the target weights, on the base itself (its weights are
    put back afterwards); saves the mask and the masked delta."""
    model = base.model
    lowrank = cfg.sift_masks.form == "lora"
    if lowrank:
        from sift.siftmasks.lowrank import tune_sign_fixed_lowrank as tune
    else:
        tune = tune_sign_fixed
    with restored_on_exit(model, cfg.compute.gradient_checkpointing):
        use_checkpointing(model, cfg)
        deltas, result = tune(
            model,
            examples,
            base.tokenizer.pad_token_id,
            cfg,
            seed,
            loss_fn=lambda m, b: completion_loss(m, *b),
            progress=progress,
        )
    digest = save_delta(staged / DELTA_FILE, deltas)
    tuned = sum(t.numel() for t in deltas.values())
    moved = sum(int((t != 0).sum()) for t in deltas.values())
    extra = {"tuned_weights": tuned, "mask_ones": moved, "sign_seed": cfg.sift_masks.sign_seed}
    if lowrank:  # B of each weight is stored: rank x rows values, the mask on them
        extra.update(form="lora", lora_r=cfg.lora.r, lora_alpha=cfg.lora.alpha)
    return digest, result, extra


def train_shards(
    ws: Workspace,
    shards: list[int] | None = None,
    base: LazyBase | None = None,
    quiet: bool = False,
    view: WorkspaceView | None = None,
    shard_locks: bool = False,
    retrain_all: bool = False,
) -> dict[str, Any]:
    """Train every selected shard whose adapter is missing or stale; skip the rest (rebuilding
    only their router files when the serving settings changed).

    A workspace trained on another stack (sift.compute) is refused with the difference named:
    its current adapters would not be what this machine computes. `retrain_all` retrains every
    selected shard here and records this stack (the caller holds the workspace lock alone).

    `shard_locks`: the caller holds the workspace lock shared with other trainers, so each shard
    is planned and written under its own lock, claimed without waiting in `shards`' order and
    the ones held elsewhere visited again until done (sift.train.ranks.steal_walk; a shard
    another trainer finished is 'unchanged').
    Returns a summary: per shard 'trained', 'unchanged', 'empty' or 'dropped'. Progress is logged
    (the "sift" logger); `quiet` silences it for this call."""
    with quieted(quiet):
        return _train_shards(ws, shards, base, view, shard_locks, retrain_all)


def _train_shards(
    ws: Workspace,
    shards: list[int] | None,
    base: LazyBase | None,
    view: WorkspaceView | None,
    shard_locks: bool,
    retrain_all: bool = False,
) -> dict[str, Any]:
    started = time.perf_counter()
    view = view or WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    base = base or LazyBase.of(cfg, state)
    stack = base_stack(base, cfg.train.threads)  # where this base will train, not where the config says
    mismatch = stack_mismatch(ws.root, state.stack, stack)
    if mismatch and not retrain_all:
        raise SiftError(mismatch)
    status: dict[int, str] = {}
    results: list[TrainResult] = []
    todo = shards if shards is not None else list(range(view.num_shards))

    def work(shard: int) -> None:
        res = _train_one(ws, view, base, cfg, state, shard, fresh=shard_locks, status=status, force=retrain_all)
        if res is not None:
            results.append(res)

    if shard_locks:  # other workers share the workspace: claim shards in `todo`'s order, steal the rest
        steal_walk(todo, lambda s: ws.shard_lock(s, block=False), work)
    else:
        for shard in todo:
            work(shard)
    if retrain_all and state.stack != stack and set(todo) >= set(range(view.num_shards)):
        # every shard was trained here: the workspace is this stack's now (a subset, as the
        # shards of a forget resumed with --retrain-all, leaves the record to the full retrain)
        state = ws.load_state()
        state.stack = stack
        ws.save_state(state)
    view.forget_plans()
    return {
        "shards": {str(k): v for k, v in sorted(status.items())},
        "trained": [r.shard for r in results],
        "unchanged": sorted(s for s, v in status.items() if v == "unchanged"),
        "steps": sum(r.steps for r in results),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _train_one(
    ws: Workspace,
    view: WorkspaceView,
    base: LazyBase,
    cfg: SiftConfig,
    state: Any,
    shard: int,
    fresh: bool,
    status: dict[int, str],
    force: bool = False,
) -> TrainResult | None:
    """Bring one shard up to date; records what happened in `status`."""
    plan = view.plan(shard, fresh=fresh)
    adir = ws.adapter_dir(shard)
    if plan.status == "dropped":
        status[shard] = "dropped"
        return None
    if plan.status == "empty":
        remove_tree(adir)
        status[shard] = "empty"
        return None
    assert plan.content_hash is not None
    if plan.status == "current" and not adapter_intact(adir):
        log.warning(f"shard {shard:>3}: its adapter file does not match its recorded hash (damaged); retraining")
    elif plan.status == "current" and not force:
        if not routers_current(adir, router_settings(cfg, state.base_model_fingerprint, plan.content_hash)):
            build_routers(base.get(), plan.rows, cfg, adir, plan.content_hash)
        status[shard] = "unchanged"
        return None
    label = f"shard {shard:>3} ({len(plan.rows)} rows)"
    res = train_shard(
        base.get(),
        plan.rows,
        cfg,
        shard,
        adir,
        plan.content_hash,
        stderr_progress(label) if progress_enabled() else None,
        reuse_stages=not force,
    )
    log.info(f"{label}: trained {res.steps} steps in {res.seconds:.1f}s, final loss {res.final_loss:.4f}")
    status[shard] = "trained"
    return res
