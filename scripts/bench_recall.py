#!/usr/bin/env python3
"""Recall of trained facts on the builtin model: one adapter on all rows (S = 1) against S shard
adapters merged (mean, task-arithmetic scales) or routed (a question answered by its owner's
shard adapter), all measured in the same run.

    .venv/bin/python scripts/bench_recall.py --people 20 --shards 1,4 --scales 0.5,1.0
    .venv/bin/python scripts/bench_recall.py --json > recall.json

Prints a table (or one JSON object with --json). Minutes to hours on 2 CPU cores: it trains.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sift.builtin.facts import make_rows  # noqa: E402
from sift.config import SiftConfig  # noqa: E402
from sift.create import create_workspace  # noqa: E402
from sift.data import read_workspace_rows  # noqa: E402
from sift.determinism import quiet_libraries  # noqa: E402
from sift.evaluate import fact_recall  # noqa: E402
from sift.generate import greedy_answers, load_routed, load_served  # noqa: E402
from sift.models import LazyBase  # noqa: E402
from sift.serve import merge_workspace  # noqa: E402
from sift.train import train_shards  # noqa: E402
from sift.workspace import Workspace  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def evaluate(model, tok, rows) -> dict:
    answers = greedy_answers(model, tok, [r["prompt"] for r in rows])
    return fact_recall(answers, rows) | {"examples": [[r["prompt"], a] for r, a in list(zip(rows, answers))[:3]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", type=int, default=20)
    ap.add_argument("--shards", default="1,4", help="comma-separated shard counts")
    ap.add_argument("--scales", default="0.5,1.0", help="task-arithmetic scales to try beside the mean")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lora-r", type=int, default=None)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--workdir", default=None, help="keep workspaces here (default: a temp folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    quiet_libraries()
    rows = make_rows(people=args.people)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sift-bench-recall-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_id = {r["id"]: r for r in rows}
    results = []
    base = None
    for S in [int(s) for s in args.shards.split(",")]:
        cfg = SiftConfig()
        cfg.model.name = args.model
        cfg.shards.num_shards = S
        cfg.data.group_by = "owner"
        if args.epochs:
            cfg.train.epochs = args.epochs
        if args.lr:
            cfg.train.lr = args.lr
        if args.lora_r:
            cfg.lora.r, cfg.lora.alpha = args.lora_r, 2.0 * args.lora_r
        ws = Workspace(work / f"ws-S{S}")
        if not ws.exists():
            create_workspace(ws, str(data), cfg)
        base = base or LazyBase(cfg.model.name, cfg.model.revision, ws.load_state().base_model_fingerprint)
        log(f"S={S}: training")
        t0 = time.perf_counter()
        summary = train_shards(ws, base=base)
        train_s = time.perf_counter() - t0
        shard_rows = read_workspace_rows(ws, cfg.data, S)
        if base.get() is not None and results == []:
            b = base.get()
            results.append({"served": "base model, untrained", "S": 0, **evaluate(b.model, b.tokenizer, rows)})
        variants = [("mean", None)] + ([] if S == 1 else [("task-arithmetic", float(x)) for x in args.scales.split(",") if x])
        for method, scale in variants:
            merge_workspace(ws, method=method, scale=scale, base=base)
            model, tok = load_served(ws.merged_dir)
            label = "one adapter, all rows" if S == 1 else (f"{S} adapters, mean" if method == "mean" else f"{S} adapters, task-arithmetic x{scale}")
            log(f"S={S}: evaluating {label}")
            results.append({"served": label, "S": S, "train_seconds": round(train_s, 1), "train_steps": summary["steps"], **evaluate(model, tok, rows)})
        if S > 1:
            log(f"S={S}: evaluating routed (own shard adapter)")
            answers, ordered = [], []
            b = base.get()
            for s, srows in sorted(shard_rows.items()):
                model = load_routed(b.model, ws.adapter_dir(s))
                rr = [by_id[r.id] for r in srows]
                answers += greedy_answers(model, b.tokenizer, [r["prompt"] for r in rr])
                ordered += rr
            results.append({"served": f"{S} adapters, routed to owner's shard", "S": S, **fact_recall(answers, ordered)})
    if args.json:
        print(json.dumps({"people": args.people, "rows": len(rows), "results": results}, indent=2))
        return
    print(f"\nRecall of {len(rows)} trained facts ({args.people} people), greedy decoding, builtin model\n")
    print(f"| {'served model':<42} | exact | contains | train s |")
    print(f"|{'-' * 44}|-------|----------|---------|")
    for r in results:
        print(f"| {r['served']:<42} | {r['exact']:5.1%} | {r['contains']:8.1%} | {r.get('train_seconds', ''):>7} |")


if __name__ == "__main__":
    main()
