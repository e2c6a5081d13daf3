"""Proof of the invariant: rebuild the workspace from scratch, from its remaining data and
config alone, in a temporary folder, and compare byte for byte what serves requests: every
served weight, every shard adapter's tensors, and every router file. Under a launcher the
ranks share the rebuild (`_verify_launched`)."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from sift.adapters import ADAPTER_CONFIG, read_meta, weights_file
from sift.compute import stack_differences, workspace_stack
from sift.errors import SiftError
from sift.fsio import atomic_write_json, remove_tree
from sift.hashing import sha256_hex, tensors_sha256
from sift.logs import get_logger, quieted
from sift.merge.driver import merge_workspace, served_hashes, served_info
from sift.merge.state import STATE_DIR, sums_sha256
from sift.models import LazyBase
from sift.routing.routers import router_file_hashes
from sift.train import train_shards
from sift.train.ranks import claim_order, launch_id, launch_rank
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
    ws: Workspace,
    tmp_dir: str | None = None,
    base: LazyBase | None = None,
    quiet: bool = False,
    changed: bool = False,
    sample: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Rebuild every shard from scratch in a temporary workspace and compare every served byte.
    Under torchrun, `accelerate launch` or srun every rank rebuilds its share of the shards into
    one shared temporary workspace and rank 0 merges and compares (`_verify_launched`); the
    other ranks return what they rebuilt. Progress is logged; `quiet` silences it for this call.

    `changed`: rebuild only the shards whose rows, config or files changed since the last
    verify that passed (VERIFIED_FILE), hash-check the others against that record, and merge
    every adapter from scratch to compare the served bytes; `sample` more untouched shards,
    drawn with `seed`, are rebuilt as a spot audit (and imply `changed`). A passing verify of
    either kind records what it proved."""
    with quieted(quiet):
        rank, world = launch_rank()
        if world > 1:
            if changed or sample:
                raise SiftError("--changed and --sample run in one process: start verify without a launcher")
            return _verify_launched(ws, tmp_dir, base, rank, world)
        started = time.perf_counter()
        plan = _plan(ws, base)
        if changed or sample:
            return _verify_changed(ws, plan, tmp_dir, sample, seed, started)
        with tempfile.TemporaryDirectory(prefix="sift-verify-", dir=tmp_dir) as tmp:
            fresh = Workspace(Path(tmp) / "ws")
            _init_fresh(fresh, plan)
            log.info(f"verify: rebuilding {len(plan.view.rows)} shard(s) from scratch in {fresh.root}")
            steps = train_shards(fresh, base=plan.base)["steps"]
            result = _merge_and_compare(ws, fresh, plan, steps, started, read := {})
        result["mode"] = "full"
        result["rebuilt"] = plan.view.served_shards()
        if result["identical"]:
            record_verified(ws, plan.view, result, read)
        return result


VERIFIED_FILE = "verified.json"  # what the last passing verify proved, shard by shard


def _files_digest(ws: Workspace, shard: int, files: dict[str, str] | None = None) -> str | None:
    """One hash of shard_files (computed here unless the caller already read them)."""
    files = shard_files(ws, shard) if files is None else files
    return None if files is None else sha256_hex(json.dumps(files, sort_keys=True).encode())


def record_verified(
    ws: Workspace, view: WorkspaceView, result: dict[str, Any], read: dict[int, dict[str, str]] | None = None
) -> None:
    """Record, for every served shard, the content hash (rows, config, base) and the hash of the
    files a passing verify proved. Kept apart from state.json, which a running server watches:
    a verify must not make it reload."""
    read = read or {}  # the shard files the comparison read: not hashed twice
    shards = {
        str(s): {"content": view.plan(s).content_hash, "files": _files_digest(ws, s, read.get(s))}
        for s in view.served_shards()
    }
    atomic_write_json(
        ws.root / VERIFIED_FILE,
        {
            "format": 1,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "mode": result["mode"],
            "served_sha256": result["served_sha256"],
            "shards": shards,
        },
    )


def read_verified(ws: Workspace) -> dict[str, Any] | None:
    try:
        record = json.loads((ws.root / VERIFIED_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise SiftError(f"{ws.root / VERIFIED_FILE} is damaged: run a full `sift verify` to record it again") from None
    if not isinstance(record, dict) or record.get("format") != 1 or not isinstance(record.get("shards"), dict):
        raise SiftError(f"{ws.root / VERIFIED_FILE} is not a verify record: run a full `sift verify`")
    return record


def _verify_changed(
    ws: Workspace, plan: _Plan, tmp_dir: str | None, sample: int, seed: int, started: float
) -> dict[str, Any]:
    """Rebuild the shards that changed since the last passing verify and `sample` seeded
    untouched ones (a spot audit); copy the rest into the rebuild after checking them against
    the record, then merge everything from scratch and compare."""
    view = plan.view
    record = read_verified(ws)
    if record is None:
        raise SiftError(
            f"workspace {ws.root} has no record of a passing verify to compare with: run a full `sift verify` first"
        )
    served = view.served_shards()
    reasons: dict[int, str] = {}
    for s in served:
        rec = record["shards"].get(str(s))
        p = view.plan(s)
        if rec is None:
            reasons[s] = "not in the last verify"
        elif rec.get("content") != p.content_hash:
            reasons[s] = "rows or config changed since the last verify"
        elif p.status != "current":
            reasons[s] = "its adapter's record names other rows or config"
        elif rec.get("files") != _files_digest(ws, s):
            reasons[s] = "its files changed since the last verify"
    untouched = [s for s in served if s not in reasons]
    rng = random.Random(seed)
    sampled = sorted(rng.sample(untouched, min(sample, len(untouched)))) if sample else []
    rebuild = sorted(set(reasons) | set(sampled))
    checked = [s for s in untouched if s not in sampled]
    with tempfile.TemporaryDirectory(prefix="sift-verify-", dir=tmp_dir) as tmp:
        fresh = Workspace(Path(tmp) / "ws")
        _init_fresh(fresh, plan)
        for s in checked:  # proven by the recorded verify: its files, hash-checked above
            shutil.copytree(ws.adapter_dir(s), fresh.adapter_dir(s))
        log.info(
            f"verify: rebuilding {len(rebuild)} shard(s) from scratch ({len(reasons)} changed, {len(sampled)} sampled); "
            f"{len(checked)} hash-checked against the verify of {record.get('time')}"
        )
        steps = train_shards(fresh, rebuild, base=plan.base)["steps"] if rebuild else 0
        result = _merge_and_compare(ws, fresh, plan, steps, started, read := {})
    result.update(
        mode="changed",
        rebuilt=rebuild,
        rebuilt_because={str(s): reasons.get(s, "sampled") for s in rebuild},
        sampled=sampled,
        hash_checked=checked,
        last_verified=record.get("time"),
    )
    if result["identical"]:
        record_verified(ws, view, result, read)
    return result


@dataclass
class _Plan:
    """What a rebuild needs, read from the workspace once: its rows and config (with the merge
    the served model records), the served hashes, the base, and this machine's stack."""

    view: WorkspaceView
    cfg: Any
    info: dict[str, Any]
    served_overall: str
    served_per: dict[str, str]
    base: LazyBase
    stack: dict[str, Any]
    stack_diff: list[str]


def _plan(ws: Workspace, base: LazyBase | None) -> _Plan:
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
    cfg.merge.served_dtype = info.get("served_dtype", "base")
    # a rebuild on another stack cannot be expected to match: say so before spending the time,
    # so that "not identical" always comes with its reason
    stack = workspace_stack(cfg.compute, cfg.train.threads)
    stack_diff = stack_differences(state.stack, stack)
    if stack_diff:
        log.warning(
            f"verify: this stack differs from the one workspace {ws.root} was trained on "
            f"({'; '.join(stack_diff)}); the rebuild is unlikely to match byte for byte"
        )
    return _Plan(view, cfg, info, served_overall, served_per, base, stack, stack_diff)


def _init_fresh(fresh: Workspace, plan: _Plan) -> None:
    """The rebuild's workspace: the remaining rows, the config, the base's fingerprint and the
    dropped shards; no adapter, router or merge."""
    state = plan.view.state
    fresh.root.mkdir(parents=True, exist_ok=True)
    fresh.save_state(
        WorkspaceState(
            base_model_fingerprint=state.base_model_fingerprint,
            dropped_shards=list(state.dropped_shards),
            stack=plan.stack,
        )
    )
    write_workspace_rows(fresh, plan.cfg.data, plan.view.rows, plan.cfg.shards.num_shards)
    fresh.save_config(plan.cfg)  # last: the rebuild exists once its config does


def _merge_and_compare(
    ws: Workspace,
    fresh: Workspace,
    plan: _Plan,
    steps: int,
    started: float,
    read: dict[int, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Merge the rebuilt shards from scratch and compare every served byte with `ws`; `read`
    receives the workspace's shard_files, for a record of what was proved."""
    cfg = plan.cfg
    merge_workspace(fresh, full=True, base=plan.base)
    rebuilt_overall, rebuilt_per = served_hashes(fresh.merged_dir)
    adapter_diff: list[int] = []
    router_diff: list[str] = []
    read = {} if read is None else read
    compared = routers = 0
    for shard in range(cfg.shards.num_shards):
        a, b = shard_files(ws, shard), shard_files(fresh, shard)
        if a is not None:
            read[shard] = a
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
    served_per = plan.served_per
    names = sorted(set(served_per) | set(rebuilt_per))
    mismatched = [n for n in names if served_per.get(n) != rebuilt_per.get(n)]
    record_matches = plan.info.get("served_sha256") == plan.served_overall  # a stale served.json is no proof
    identical = (
        plan.served_overall == rebuilt_overall
        and not mismatched
        and not adapter_diff
        and not router_diff
        and sums_match
        and not file_diff
        and record_matches
    )
    return {
        "identical": identical,
        "served_sha256": plan.served_overall,
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
        "method": plan.info["method"],
        "stack_differences": plan.stack_diff,  # [] when the stacks agree (or the workspace recorded none)
        "rows": sum(len(r) for r in plan.view.rows.values()),
        "steps": steps,  # optimizer steps of the rebuild
        "seconds": round(time.perf_counter() - started, 3),
    }


REPORT = "report.json"  # in a launch's rebuild folder: rank 0's result, for ranks that come late


def rebuild_folder(ws: Workspace, tmp_dir: str | None) -> Path:
    """The one rebuild folder every rank of a launch computes alike, with no messages: named by
    the workspace's state and config and by the launch (torchrun's run id, Slurm's job and step,
    the rendezvous address). By default it sits inside the workspace, which every rank sees
    (the system temp folder is one per node); a hidden *.tmp folder there that a crash leaves
    is deleted by the next command that changes the workspace."""
    ident = "|".join([sha256_hex(ws.state_path.read_bytes()), sha256_hex(ws.config_path.read_bytes()), launch_id()])
    name = f"sift-verify-{sha256_hex(ident.encode())[:16]}"
    return Path(tmp_dir) / name if tmp_dir else ws.root / f".{name}.tmp"


def _verify_launched(
    ws: Workspace, tmp_dir: str | None, base: LazyBase | None, rank: int, world: int
) -> dict[str, Any]:
    """Verify as one rank of `world`: every rank claims shards of one shared rebuild
    (steal_walk, as train-shards does); rank 0 then waits, under the rebuild's exclusive lock,
    for the others to finish, merges, compares and removes the rebuilt workspace, leaving its
    report for a rank that comes after it is done."""
    started = time.perf_counter()
    plan = _plan(ws, base)
    folder = rebuild_folder(ws, tmp_dir)
    launch = Workspace(folder)  # its lock guards the rebuild; the rebuilt workspace is folder/ws
    fresh = Workspace(folder / "ws")
    report = folder / REPORT
    timeout = 24 * 3600.0  # another rank may hold a shard for as long as its training takes
    with launch.lock(exclusive=True, wait=timeout, command=f"verify rank {rank}"):
        if rank == 0:
            report.unlink(missing_ok=True)  # a report of an earlier launch is not this one's
        elif report.exists():  # rank 0 finished before this rank came: nothing left to rebuild
            return {"rank": rank, "world_size": world, "rebuilt": [], "rebuild": str(folder)}
        if not fresh.exists():
            _init_fresh(fresh, plan)
            log.info(f"verify: rank {rank} of {world} made the shared rebuild {fresh.root}")
    with launch.lock(exclusive=False, wait=timeout, command=f"verify rank {rank}"):
        view = WorkspaceView.load(fresh)
        order = claim_order(view, list(range(view.num_shards)), rank, world)
        summary = train_shards(fresh, order, base=plan.base, view=view, shard_locks=True)
    if rank != 0:
        return {"rank": rank, "world_size": world, "rebuilt": summary["trained"], "rebuild": str(folder)}
    # every shard is done (rank 0's walk ends only then); the exclusive lock waits out ranks
    # still walking shards they find done
    with launch.lock(exclusive=True, wait=timeout, command="verify rank 0"):
        steps = sum(int(read_meta(fresh.adapter_dir(s)).get("steps", 0)) for s in plan.view.served_shards())
        result = _merge_and_compare(ws, fresh, plan, steps, started, read := {})
        result.update(rank=0, world_size=world, rebuilt=summary["trained"], mode="full")
        if result["identical"]:
            record_verified(ws, plan.view, result, read)
        remove_tree(fresh.root)
        atomic_write_json(report, result)
    return result
