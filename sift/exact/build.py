"""`sift train-shards` as one library call: create the workspace (first run) or check that the
settings and data given match it, finish an interrupted forget, split the shards over the ranks
of a launch, and train what is not current.

The lock choreography lives here, not in the CLI: creating a workspace or finishing a forget
needs it alone, so rank 0 of a launch creates it under the exclusive lock while the other ranks
wait for it to exist and check it under the shared one; trainers that share an existing
workspace (ranks, or shell jobs each given --shards) hold the shared lock and claim one shard
lock at a time.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sift.config import SiftConfig, apply_overrides, load_config
from sift.errors import SiftError
from sift.logs import get_logger

log = get_logger(__name__)


@dataclass
class TrainSettings:
    """The settings `sift train-shards` takes as flags; None leaves the config's value (a new
    workspace) or must match it (an existing one). `lr` is the rate of the workspace's method
    (train.lr for LoRA, sift_masks.lr for sift-masks); `targets` applies to sift-masks only."""

    model: str | None = None
    num_shards: int | None = None
    group_by: str | None = None
    id_column: str | None = None
    method: str | None = None
    targets: list[str] | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    seed: int | None = None
    slices: int | None = None
    router: str | None = None
    fallback: str | None = None
    device: str | None = None
    dtype: str | None = None
    attn: str | None = None
    gradient_checkpointing: bool | None = None
    min_steps: int | None = None
    mask_density: float | None = None
    mask_form: str | None = None

    def overrides(self, sift_masks: bool) -> dict[tuple[str, str], Any]:
        """(section, key) -> value, for config.apply_overrides."""
        if self.targets is not None and not sift_masks:
            raise SiftError(
                "--targets applies to --method sift-masks only (LoRA targets are lora.target_modules in a --config)"
            )
        if self.mask_density is not None and not sift_masks:
            raise SiftError("--mask-density applies to --method sift-masks only")
        if self.mask_form is not None and not sift_masks:
            raise SiftError("--mask-form applies to --method sift-masks only")
        where = {
            "model": ("model", "name"),
            "num_shards": ("shards", "num_shards"),
            "group_by": ("data", "group_by"),
            "method": ("train", "method"),
            "targets": ("sift_masks", "target_modules"),
            "id_column": ("data", "id_column"),
            "epochs": ("train", "epochs"),
            "lr": ("sift_masks" if sift_masks else "train", "lr"),
            "batch_size": ("train", "batch_size"),
            "lora_r": ("lora", "r"),
            "lora_alpha": ("lora", "alpha"),
            "seed": ("train", "seed"),
            "slices": ("train", "slices"),
            "router": ("serving", "router"),
            "fallback": ("serving", "fallback"),
            "device": ("compute", "device"),
            "dtype": ("compute", "dtype"),
            "attn": ("compute", "attn"),
            "gradient_checkpointing": ("compute", "gradient_checkpointing"),
            "min_steps": ("train", "min_steps"),
            "mask_density": ("sift_masks", "density"),
            "mask_form": ("sift_masks", "form"),
        }
        return {where[f.name]: getattr(self, f.name) for f in fields(self)}


def _wait_for_creation(ws: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ws.exists():
        if time.monotonic() >= deadline:
            raise SiftError(f"rank 0 did not create workspace {ws.root} within {timeout:.0f}s (see its error)")
        time.sleep(0.2)


_FLAGS = {"target_modules": "--targets", "density": "--mask-density", "form": "--mask-form"}


def _flag(section: str, key: str) -> str:
    return _FLAGS.get(key) or f"--{key.replace('_', '-')}"


def train_workspace(
    workspace: Path,
    data: str | None = None,
    settings: TrainSettings | None = None,
    config: Path | None = None,
    shards: str | None = None,
    wait: float = 0.0,
    retrain_all: bool = False,
) -> dict[str, Any]:
    """Create the workspace from `data` if it is not one yet, then train its shards (`shards`: a
    spec such as `0-3,7`, None for all). Under torchrun, `accelerate launch` or srun, and for shell
    jobs given --shards, every trainer claims the shards it finds free, its own share first, and
    takes over what the others have not finished (sift.train.ranks.steal_walk). Returns the training summary, with `created`, and `rank`
    and `world_size` when trainers share the workspace.

    `retrain_all` retrains every shard on this machine's stack and records it (a workspace moved
    to another GPU, CPU or library version refuses to train otherwise); with it, `device` may
    move an existing workspace to another device."""
    from sift.exact.forget import resume_pending_change
    from sift.train import train_shards
    from sift.train.ranks import claim_order, launch_rank, parse_shard_spec
    from sift.workspace import Workspace
    from sift.workspace.create import check_same_data, create_workspace
    from sift.workspace.view import WorkspaceView

    settings = settings or TrainSettings()
    ws = Workspace(workspace)
    sift_masks = settings.method == "sift-masks" or (
        settings.method is None and ws.exists() and ws.load_config().train.method == "sift-masks"
    )
    overrides = settings.overrides(sift_masks)
    if not ws.exists() and data is None:
        raise SiftError(f"{workspace} is not a workspace yet: give --data to create it")
    rank, world = launch_rank()
    if retrain_all and (world > 1 or shards is not None):
        raise SiftError("--retrain-all retrains every shard in one process: leave out --shards and the launcher")
    together = world > 1 or shards is not None  # other trainers may share the workspace
    if world > 1 and rank > 0 and not ws.exists():
        # rank 0 creates it; waiting for the exclusive lock instead would starve behind the
        # shared lock rank 0 trains under, and this rank would start only when rank 0 is done
        _wait_for_creation(ws, max(wait, 600.0))
    fresh_folder = not workspace.exists()
    alone = not together or not ws.exists() or ws.change_pending()
    created = None
    with ws.lock(exclusive=alone, wait=max(wait, 600.0) if world > 1 else wait, command="train-shards"):
        if not ws.exists():
            try:
                cfg = apply_overrides(load_config(config) if config else SiftConfig(), overrides)
                if cfg.train.method == "sift-masks" and cfg.merge.method == "mean":
                    # serve what the method is for, unless told otherwise: sift's per-coordinate variant,
                    # which the measurements favour (docs/benchmarks.md#sift-masks-that-learns)
                    lora_form = cfg.sift_masks.form == "lora"
                    cfg.merge.method = "sift-masks-lora-coordinate" if lora_form else "sift-masks-coordinate"
                cfg.validate()
                assert data is not None
                created = create_workspace(ws, data, cfg)
            except BaseException:
                if fresh_folder:  # leave no half-made folder behind a refused data set
                    shutil.rmtree(workspace, ignore_errors=True)
                raise
            log.info(
                f"sift: workspace {workspace}: {created['rows']} rows in {created['shards_with_rows']} of {cfg.shards.num_shards} shards"
            )
        else:
            cfg = ws.load_config()
            moving = retrain_all and settings.device is not None and settings.device != cfg.compute.device
            if moving:  # the move it asks for; saved once every other check has passed
                cfg = apply_overrides(cfg, {("compute", "device"): settings.device})
            clash = [
                _flag(section, key)
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
            if moving:
                ws.save_config(cfg)
            if alone:  # with --retrain-all, a forget cut short on another stack can finish here
                resume_pending_change(ws, retrain_all=retrain_all)
        if not together:
            summary = train_shards(ws, parse_shard_spec(shards, cfg.shards.num_shards), retrain_all=retrain_all)
    if together:  # the workspace lock shared with the other trainers, one lock per shard
        with ws.lock(exclusive=False, wait=wait, command="train-shards"):
            view = WorkspaceView.load(ws)
            order = claim_order(view, parse_shard_spec(shards, cfg.shards.num_shards), rank, world)
            summary = train_shards(ws, order, view=view, shard_locks=True)
        summary.update(rank=rank, world_size=world)
    summary["created"] = created is not None
    return summary
