#!/usr/bin/env python3
"""What a one-owner forget costs against the from-scratch rebuild it replaces, with and without
SISA slices; builtin model and data, measured in one run.

    .venv/bin/python scripts/bench_forget.py                          # 16 people, S = 16 by owner, R = 4
    .venv/bin/python scripts/bench_forget.py --people 8 --shards 8 --slices 4 --json

For each of (no slices, --slices R): a workspace is trained and merged (not timed), then
- forget_s:  `sift forget` of every row of one owner (retrain what is left of the owner's shard,
             from its first affected slice when sliced, then the incremental re-merge);
- rebuild_s: `sift verify`, which trains every shard from scratch on the remaining rows, merges
             from scratch and compares every byte (the exact alternative; it must say identical).
The owner forgotten is the first (by name) whose shard holds others too (`--owner` to choose),
so that the forget retrains rather than just empties a shard; then (forget2_s, not verified)
an owner in the last slice whose shard holds others, where slices save the most. Target from the issue:
forget_s <= 1.2 x rebuild_s / S.

Then the proof of that second forget, both ways, on the same workspace:
- changed_s: `sift verify --changed`: rebuilds only the shard the second forget changed (the first
             verify recorded the rest), hash-checks the others, merges everything from scratch and
             compares; target changed_s <= 1.5 x forget2_s;
- verify2_s: the full `sift verify` of the same state, for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def late_owner(rows: list[dict], shards: int, slices: int, skip: str) -> str:
    """An owner in the last slice (the most a forget can reuse) whose shard keeps other rows."""
    from sift.hashing import shard_of
    from sift.train import slice_of

    owners = sorted({r["owner"] for r in rows} - {skip})
    shared = [o for o in owners if sum(shard_of(x, shards) == shard_of(o, shards) for x in owners) > 1] or owners
    return max(shared, key=lambda o: (slice_of(o, slices), o))


def first_owner(rows: list[dict], shards: int) -> str:
    """The first owner (by name) whose shard holds someone else too: its forget retrains."""
    from sift.hashing import shard_of

    per_shard = Counter(shard_of(o, shards) for o in {r["owner"] for r in rows})
    shared = sorted(o for o in {r["owner"] for r in rows} if per_shard[shard_of(o, shards)] > 1)
    return shared[0] if shared else sorted({r["owner"] for r in rows})[0]


def run(
    people: int, shards: int, slices: int, owner: str, workdir: Path, quiet: bool, second: str, model: str = "builtin"
) -> dict:
    from sift.builtin.facts import make_rows
    from sift.config import SiftConfig
    from sift.exact.forget import forget
    from sift.exact.verify import verify
    from sift.hashing import shard_of
    from sift.merge.driver import merge_workspace
    from sift.train import slice_of, train_shards
    from sift.workspace import Workspace
    from sift.workspace.create import create_workspace

    rows = make_rows(people=people, seed=0)
    data = workdir / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_shard = Counter(shard_of(o, shards) for o in {r["owner"] for r in rows})
    ids = [r["id"] for r in rows if r["owner"] == owner]
    cfg = SiftConfig()
    cfg.model.name = model
    cfg.shards.num_shards, cfg.data.group_by, cfg.train.slices = shards, "owner", slices
    ws = Workspace(workdir / f"ws-r{slices}")
    shutil.rmtree(ws.root, ignore_errors=True)
    create_workspace(ws, str(data), cfg)
    t = time.perf_counter()
    train_shards(ws, quiet=quiet)
    merge_workspace(ws)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    cert = forget(ws, ids, quiet=quiet)
    forget_s = time.perf_counter() - t
    t = time.perf_counter()
    check = verify(ws, quiet=quiet)
    rebuild_s = time.perf_counter() - t
    ids2 = [r["id"] for r in rows if r["owner"] == second]
    t = time.perf_counter()
    cert2 = forget(ws, ids2, quiet=quiet)
    forget2_s = time.perf_counter() - t
    t = time.perf_counter()
    changed = verify(ws, changed=True, quiet=quiet)
    changed_s = time.perf_counter() - t
    t = time.perf_counter()
    full2 = verify(ws, quiet=quiet)
    verify2_s = time.perf_counter() - t
    shard = shard_of(owner, shards)
    return {
        "changed_s": changed_s,
        "changed_rebuilt": changed["rebuilt"],
        "changed_hash_checked": len(changed["hash_checked"]),
        "changed_identical": changed["identical"],
        "verify2_s": verify2_s,
        "verify2_identical": full2["identical"],
        "second_owner": second,
        "second_slice": slice_of(second, slices) if slices > 1 else 0,
        "forget2_s": forget2_s,
        "second_retrained": cert2["shards_retrained"],
        "owner": owner,
        "shard": shard,
        "rows_forgotten": len(ids),
        "slice": slice_of(owner, slices) if slices > 1 else 0,
        "shard_rows_left": sum(1 for r in rows if shard_of(r["owner"], shards) == shard and r["owner"] != owner),
        "non_empty_shards": len(per_shard),
        "build_s": build_s,
        "forget_s": forget_s,
        "rebuild_s": rebuild_s,
        "identical": check["identical"],
        "merge_mode": (cert.get("merge") or {}).get("mode"),
        "retrained": cert["shards_retrained"],
        "emptied": cert["shards_emptied"],
    }


def shard_of_name(owner: str, shards: int) -> int:
    from sift.hashing import shard_of

    return shard_of(owner, shards)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--people", type=int, default=16)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--slices", type=int, default=4, help="R for the sliced run (the other run has none)")
    p.add_argument("--owner", default=None, help="whose rows to forget (default: see above)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--verbose", action="store_true", help="show training progress")
    p.add_argument("--model", default="builtin", help="base model (builtin-tiny: a smoke run in seconds)")
    args = p.parse_args(argv)
    if args.people < 2 or args.shards < 2 or args.slices < 2:
        p.error("--people, --shards and --slices must be at least 2")
    tmp = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sift-bench-forget-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from sift.builtin.facts import make_rows

    rows = make_rows(people=args.people, seed=0)
    owner = args.owner or first_owner(rows, args.shards)
    second = late_owner(rows, args.shards, args.slices, owner)
    try:
        plain = run(args.people, args.shards, 1, owner, workdir, not args.verbose, second, args.model)
        sliced = run(args.people, args.shards, args.slices, owner, workdir, not args.verbose, second, args.model)
    finally:
        if tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    S = args.shards
    result = {
        "num_shards": S,
        "people": args.people,
        "slices": args.slices,
        "owner": plain["owner"],
        "forget_s": round(plain["forget_s"], 2),
        "rebuild_s": round(plain["rebuild_s"], 2),
        "forget_over_rebuild": round(plain["forget_s"] / plain["rebuild_s"], 4),
        "forget_s_slices": round(sliced["forget_s"], 2),
        "rebuild_s_slices": round(sliced["rebuild_s"], 2),
        "forget_over_rebuild_slices": round(sliced["forget_s"] / sliced["rebuild_s"], 4),
        "target_forget_over_rebuild": round(1.2 / S, 4),
        "second_owner": second,
        "second_slice": sliced["second_slice"],
        "forget2_s": round(plain["forget2_s"], 2),
        "forget2_s_slices": round(sliced["forget2_s"], 2),
        "forget2_over_rebuild": round(plain["forget2_s"] / plain["rebuild_s"], 4),
        "forget2_over_rebuild_slices": round(sliced["forget2_s"] / sliced["rebuild_s"], 4),
        "changed_s": round(plain["changed_s"], 2),
        "verify2_s": round(plain["verify2_s"], 2),
        "changed_over_forget2": round(plain["changed_s"] / plain["forget2_s"], 3),
        "changed_over_full_verify": round(plain["changed_s"] / plain["verify2_s"], 4),
        "changed_s_slices": round(sliced["changed_s"], 2),
        "changed_over_forget2_slices": round(sliced["changed_s"] / sliced["forget2_s"], 3),
        "changed_over_full_verify_slices": round(sliced["changed_s"] / sliced["verify2_s"], 4),
        "target_changed_over_forget": 1.5,
        "identical": all(
            r[k] for r in (plain, sliced) for k in ("identical", "changed_identical", "verify2_identical")
        ),
        "plain": plain,
        "sliced": sliced,
        "machine": f"{os.cpu_count()} CPU cores",
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"one-owner forget vs from-scratch rebuild: builtin model, {args.people} people, S = {S} by owner "
        f"({plain['non_empty_shards']} non-empty), {result['machine']}"
    )
    print(
        f"forgot {plain['owner']}: {plain['rows_forgotten']} rows of shard {plain['shard']}, which keeps "
        f"{plain['shard_rows_left']} rows; in the sliced run the owner's rows are in slice {sliced['slice']} of {args.slices}"
    )
    print("| run | forget s | rebuild s | forget / rebuild | target 1.2/S | identical |")
    print("|---|---|---|---|---|---|")
    for name, r in (("no slices", plain), (f"R = {args.slices} slices", sliced)):
        print(
            f"| {name} | {r['forget_s']:.1f} | {r['rebuild_s']:.1f} | {r['forget_s'] / r['rebuild_s']:.4f} | "
            f"{1.2 / S:.4f} | {r['identical']} |"
        )
    print(f"then forgot {second} (slice {sliced['second_slice']} of {args.slices}, shard {shard_of_name(second, S)}):")
    for name, r in (("no slices", plain), (f"R = {args.slices} slices", sliced)):
        print(
            f"| {name} | {r['forget2_s']:.1f} | {r['rebuild_s']:.1f} | {r['forget2_s'] / r['rebuild_s']:.4f} | {1.2 / S:.4f} | |"
        )
    print("proof of the second forget: verify --changed against the full verify of the same state")
    print(
        "| run | forget s | verify --changed s | shards rebuilt / hash-checked | full verify s | "
        "changed / forget (target 1.5) | changed / full | both identical |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in (("no slices", plain), (f"R = {args.slices} slices", sliced)):
        print(
            f"| {name} | {r['forget2_s']:.1f} | {r['changed_s']:.1f} | {len(r['changed_rebuilt'])} / "
            f"{r['changed_hash_checked']} | {r['verify2_s']:.1f} | {r['changed_s'] / r['forget2_s']:.2f} | "
            f"{r['changed_s'] / r['verify2_s']:.3f} | {r['changed_identical'] and r['verify2_identical']} |"
        )


if __name__ == "__main__":
    main()
