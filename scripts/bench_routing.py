#!/usr/bin/env python3
"""Where each router sends the builtin questions, with the frozen base alone (no training).

For S shards by owner of the builtin data, every shard's router files are built exactly as
`sift train-shards` builds them (sift.routing.routers.build_routers: they depend on the shard's
rows and the frozen base, not on its adapter), and each router decides every trained question,
its paraphrase and every general-knowledge question. Reported: the share of fact questions sent
to the owner's shard, the share of general questions some shard claims (those reach a shard's
adapter instead of the fallback), and the embed router's score margins: the lowest ratio
(score / shard's self-score) of a paraphrase and the highest of a general question, against
`serving.embed_threshold`.

    .venv/bin/python scripts/bench_routing.py                  # 32 people, S = 4,16,32
    .venv/bin/python scripts/bench_routing.py --people 8 --shards 4 --model builtin-tiny
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
from sift.builtin.general import general_rows  # noqa: E402
from sift.config import SiftConfig  # noqa: E402
from sift.data import Row  # noqa: E402
from sift.determinism import quiet_libraries  # noqa: E402
from sift.hashing import shard_of  # noqa: E402
from sift.models import load_base_model  # noqa: E402
from sift.routing.routers import ROUTER_KINDS, build_routers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", type=int, default=32)
    ap.add_argument("--shards", default="4,16,32")
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    quiet_libraries()
    base = load_base_model(args.model)
    facts = make_rows(people=args.people)
    general = [g["prompt"] for g in general_rows()]
    results = []
    for S in [int(s) for s in args.shards.split(",") if s]:
        cfg = SiftConfig()
        cfg.model.name, cfg.shards.num_shards, cfg.data.group_by = args.model, S, "owner"
        owner = [shard_of(r["owner"], S) for r in facts]
        rows: dict[int, list[Row]] = {}
        for r, s in zip(facts, owner):
            rows.setdefault(s, []).append(Row(r["id"], r["owner"], r["prompt"], r["completion"], None, r))
        with tempfile.TemporaryDirectory() as tmp:
            folders = {}
            for s, rs in sorted(rows.items()):
                folders[s] = Path(tmp) / f"shard-{s:04d}"
                folders[s].mkdir()
                build_routers(base, rs, cfg, folders[s], "bench")
            for name, score in (("keys", None), ("embed", "excess"), ("embed", "late")):
                if score:
                    cfg.serving.embed_score = score
                index = ROUTER_KINDS[name].load(folders, _Lazy(base), cfg)
                started = time.perf_counter()
                trained = [index.route(r["prompt"]) for r in facts]
                para = [index.route(r["paraphrased_prompt"]) for r in facts]
                gen = [index.route(q) for q in general]
                row = {
                    "S": S,
                    "nonempty": len(rows),
                    "router": name if score is None else f"embed ({score})",
                    "trained_to_owner": sum(d.shard == o for d, o in zip(trained, owner)) / len(facts),
                    "paraphrased_to_owner": sum(d.shard == o for d, o in zip(para, owner)) / len(facts),
                    "general_claimed": sum(d.shard is not None for d in gen) / len(gen),
                    "seconds_per_prompt": round((time.perf_counter() - started) / (2 * len(facts) + len(gen)), 4),
                }
                if score == "excess":
                    floors = index.floors()
                    base_of = {s: f / cfg.serving.embed_threshold for s, f in floors.items()}
                    best = [
                        max(index.scores(r["paraphrased_prompt"]).items(), key=lambda kv: (kv[1], -kv[0]))
                        for r in facts
                    ]
                    row["paraphrase_lowest_ratio"] = round(min(v / base_of[s] for s, v in best), 3)
                    gbest = [max(index.scores(q).items(), key=lambda kv: (kv[1], -kv[0])) for q in general]
                    row["general_highest_ratio"] = round(max(v / base_of[s] for s, v in gbest), 3)
                    row["threshold"] = cfg.serving.embed_threshold
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        "| S | shards | router | trained to owner | paraphrased to owner | general claimed | paraphrase lowest ratio | general highest ratio | s/prompt |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['S']} | {r['nonempty']} | {r['router']} | {100 * r['trained_to_owner']:.1f} % | "
            f"{100 * r['paraphrased_to_owner']:.1f} % | {100 * r['general_claimed']:.1f} % | "
            f"{r.get('paraphrase_lowest_ratio', '–')} | {r.get('general_highest_ratio', '–')} | {r['seconds_per_prompt']} |"
        )


class _Lazy:
    """The loaded base where a router's loader expects a LazyBase."""

    def __init__(self, base):
        self._base = base

    def get(self):
        return self._base


if __name__ == "__main__":
    main()
