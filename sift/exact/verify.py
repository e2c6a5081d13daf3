"""Proof of the invariant: rebuild the workspace from scratch, from its remaining data and
config alone, in a temporary folder, and compare byte for byte what serves requests: every
served weight, every shard adapter's tensors, and every router file."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from sift.adapters import ADAPTER_CONFIG, weights_file
from sift.compute import stack_differences, workspace_stack
from sift.errors import SiftError
from sift.hashing import sha256_hex, tensors_sha256
from sift.logs import get_logger, quieted
from sift.merge.driver import merge_workspace, served_hashes, served_info
from sift.merge.state import STATE_DIR, sums_sha256
from sift.models import LazyBase
from sift.routing.routers import router_file_hashes
from sift.train import train_shards
from sift.train.sisa import SLICES_DIR
from sift.workspace import Workspace, WorkspaceState
from sift.workspace.layout import shard_name
from sift.workspace.rows import write_workspace_rows
from sift.workspace.view import WorkspaceView

log = get_logger(__name__)


WEIGHTS = "weights"  # the key of a shard's trained tensors (LoRA adapter or SIFT-Masks mask + delta)


def shard_files(ws: Workspace, shard: int) -> dict[str, str] | None:
    """Hashes of what a shard serves, read from the files themselves (not from its records):
    the adapter's tensors (for SIFT-Masks: its mask and delta) and each router file. None when
    the shard has no adapter."""
    folder = ws.adapter_dir(shard)
    weights = weights_file(folder)
    if weights is None:
        return None
    try:
        adapter = weights.name + ":" + tensors_sha256(load_file(str(weights)))[0]
    except Exception:  # a damaged file differs from anything rebuilt
        adapter = "unreadable"
    stages = {}
    for ck in sorted((folder / SLICES_DIR).glob("*.safetensors")):  # SISA checkpoints serve later forgets
        try:
            stages[f"{SLICES_DIR}/{ck.name}"] = tensors_sha256(load_file(str(ck)))[0]
        except Exception:
            stages[f"{SLICES_DIR}/{ck.name}"] = "unreadable"
    config = folder / ADAPTER_CONFIG  # peft reads it to serve the adapter: compared byte for byte
    files = {ADAPTER_CONFIG: sha256_hex(config.read_bytes())} if config.exists() else {}
    return {WEIGHTS: adapter, **router_file_hashes(folder), **stages, **files}


def served_files(folder: Path) -> dict[str, str]:
    """sha256 of the served folder's files other than the weights and sift-merge/ (config,
    generation config, tokenizer): a loader reads them too, so a rebuild must write the same bytes."""
    return {
        f.name: sha256_hex(f.read_bytes())
        for f in sorted(folder.iterdir())
        if f.is_file() and f.suffix != ".safetensors"
    }


def accumulator_sha256(ws: Workspace) -> str | None:
    """Hash of the served model's int64 sums (None when its method keeps none). SIFT-Masks
    serves routed requests from these sums, so they are compared like the served weights."""
    return sums_sha256(ws.merged_dir / STATE_DIR)


def verify(
    ws: Workspace, tmp_dir: str | None = None, base: LazyBase | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Rebuild every shard from scratch in a temporary workspace and compare every served byte.
    Progress is logged; `quiet` silences it for this call."""
    with quieted(quiet):
        return _verify(ws, tmp_dir, base)


def _verify(ws: Workspace, tmp_dir: str | None, base: LazyBase | None) -> dict[str, Any]:
    started = time.perf_counter()
    view = WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    info = served_info(ws)
    if info is None:
        raise SiftError(f"workspace {ws.root} has no served model to verify; run `sift merge -w {ws.root}`")
    served_overall, served_per = served_hashes(ws.merged_dir)
    base = base or LazyBase.of(cfg, state)
    # rebuild with the method and parameters the served model was merged with (its record)
    cfg.merge.method, cfg.merge.params, cfg.merge.scale, cfg.merge.density = (
        info["method"],
        dict(info["params"]),
        None,
        None,
    )
    # a rebuild on another stack cannot be expected to match: say so before spending the time,
    # so that "not identical" always comes with its reason
    stack = workspace_stack(cfg.compute, cfg.train.threads)
    stack_diff = stack_differences(state.stack, stack)
    if stack_diff:
        log.warning(
            f"verify: this stack differs from the one workspace {ws.root} was trained on "
            f"({'; '.join(stack_diff)}); the rebuild is unlikely to match byte for byte"
        )
    with tempfile.TemporaryDirectory(prefix="sift-verify-", dir=tmp_dir) as tmp:
        fresh = Workspace(Path(tmp) / "ws")
        fresh.root.mkdir()
        fresh.save_state(
            WorkspaceState(
                base_model_fingerprint=state.base_model_fingerprint,
                dropped_shards=list(state.dropped_shards),
                stack=stack,
            )
        )
        write_workspace_rows(fresh, cfg.data, view.rows, cfg.shards.num_shards)
        fresh.save_config(cfg)
        log.info(f"verify: rebuilding {len(view.rows)} shard(s) from scratch in {fresh.root}")
        steps = train_shards(fresh, base=base)["steps"]
        merge_workspace(fresh, full=True, base=base)
        rebuilt_overall, rebuilt_per = served_hashes(fresh.merged_dir)
        adapter_diff: list[int] = []
        router_diff: list[str] = []
        compared = routers = 0
        for shard in range(cfg.shards.num_shards):
            a, b = shard_files(ws, shard), shard_files(fresh, shard)
            if a is None and b is None:
                continue
            compared += 1
            a, b = a or {}, b or {}
            if a.get(WEIGHTS) != b.get(WEIGHTS):
                adapter_diff.append(shard)
            for name in sorted((set(a) | set(b)) - {WEIGHTS}):
                routers += 1
                if a.get(name) != b.get(name):
                    router_diff.append(f"{shard_name(shard)}/{name}")
        sums_match = accumulator_sha256(ws) == accumulator_sha256(fresh)
        mine, theirs = served_files(ws.merged_dir), served_files(fresh.merged_dir)
        file_diff = sorted(n for n in set(mine) | set(theirs) if mine.get(n) != theirs.get(n))
    names = sorted(set(served_per) | set(rebuilt_per))
    mismatched = [n for n in names if served_per.get(n) != rebuilt_per.get(n)]
    record_matches = info.get("served_sha256") == served_overall  # a stale served.json is no proof
    identical = (
        served_overall == rebuilt_overall
        and not mismatched
        and not adapter_diff
        and not router_diff
        and sums_match
        and not file_diff
        and record_matches
    )
    return {
        "identical": identical,
        "served_sha256": served_overall,
        "rebuilt_sha256": rebuilt_overall,
        "tensors": len(names),
        "mismatched_tensors": mismatched[:20],
        "adapters_compared": compared,
        "mismatched_adapters": adapter_diff,
        "shard_files_compared": routers,  # router files, adapter_config.json, slice checkpoints
        "mismatched_shard_files": router_diff,
        "merge_sums_match": sums_match,
        "served_files_compared": len(set(mine) | set(theirs)),
        "mismatched_served_files": file_diff,
        "served_record_matches_files": record_matches,
        "method": info["method"],
        "stack_differences": stack_diff,  # [] when the stacks agree (or the workspace recorded none)
        "rows": sum(len(r) for r in view.rows.values()),
        "steps": steps,  # optimizer steps of the rebuild
        "seconds": round(time.perf_counter() - started, 3),
    }
