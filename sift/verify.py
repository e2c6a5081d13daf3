"""Proof of the invariant: rebuild the workspace from scratch, from its remaining data and
config alone, in a temporary folder, and compare the served weights byte for byte."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sift.adapters import read_meta
from sift.data import read_workspace_rows, write_workspace_rows
from sift.errors import SiftError
from sift.models import LazyBase
from sift.serve import merge_workspace, served_hashes, served_info
from sift.train import train_shards
from sift.workspace import Workspace, WorkspaceState


def verify(ws: Workspace, tmp_dir: str | None = None, base: LazyBase | None = None, quiet: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    cfg, state = ws.load_config(), ws.load_state()
    info = served_info(ws)
    if info is None:
        raise SiftError(f"workspace {ws.root} has no served model to verify; run `sift merge -w {ws.root}`")
    served_overall, served_per = served_hashes(ws.merged_dir)
    base = base or LazyBase(cfg.model.name, cfg.model.revision, state.base_model_fingerprint)
    cfg.merge.method, cfg.merge.scale = info["method"], info["scale"]
    with tempfile.TemporaryDirectory(prefix="sift-verify-", dir=tmp_dir) as tmp:
        fresh = Workspace(Path(tmp) / "ws")
        fresh.root.mkdir()
        fresh.save_state(WorkspaceState(base_model_fingerprint=state.base_model_fingerprint, dropped_shards=list(state.dropped_shards)))
        rows = read_workspace_rows(ws, cfg.data, cfg.shards.num_shards)
        write_workspace_rows(fresh, cfg.data, rows, cfg.shards.num_shards)
        fresh.save_config(cfg)
        if not quiet:
            print(f"verify: rebuilding {len(rows)} shard(s) from scratch in {fresh.root}", file=sys.stderr, flush=True)
        train_shards(fresh, base=base, quiet=quiet)
        merge_workspace(fresh, full=True, base=base)
        rebuilt_overall, rebuilt_per = served_hashes(fresh.merged_dir)
        adapter_diff = []
        compared = 0
        for shard in range(cfg.shards.num_shards):
            a, b = read_meta(ws.adapter_dir(shard)), read_meta(fresh.adapter_dir(shard))
            if a is None and b is None:
                continue
            compared += 1
            if (a or {}).get("adapter_sha256") != (b or {}).get("adapter_sha256"):
                adapter_diff.append(shard)
    names = sorted(set(served_per) | set(rebuilt_per))
    mismatched = [n for n in names if served_per.get(n) != rebuilt_per.get(n)]
    identical = served_overall == rebuilt_overall and not mismatched
    return {
        "identical": identical,
        "served_sha256": served_overall,
        "rebuilt_sha256": rebuilt_overall,
        "tensors": len(names),
        "mismatched_tensors": mismatched[:20],
        "adapters_compared": compared,
        "mismatched_adapters": adapter_diff,
        "served_record_matches_files": info.get("served_sha256") == served_overall,
        "method": info["method"],
        "rows": sum(len(r) for r in rows.values()),
        "seconds": round(time.perf_counter() - started, 3),
    }
