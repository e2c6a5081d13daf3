#!/usr/bin/env python3
"""SIFT-Masks served at several mask densities, from one trained workspace, in one run.

`sift_masks.density` is applied to a shard's delta after its training (sift.siftmasks.tune.keep_largest:
the largest |tau_c| entries of each weight are kept, from the shard's own delta alone), so a
workspace trained at density 1 holds every sparser shard too: this script cuts each stored delta
to each density, builds the exact sums (and per-entry counts) the merge would keep, and answers
every shard's own questions with

  alone        theta0 + cut tau_c                      (the shard by itself)
  sift-masks   theta0 + m_c * sum / T                  (the paper's masked model, T shards)
  coordinate   theta0 + m_c * sum / count              (sift's per-coordinate variant)
  merged       theta0 + sum / T and theta0 + sum / count, no mask (trained and general questions)

No training: the numbers are what `train-shards --mask-density X` would serve, without training
the workspace again at each X (the training is the same; only the cut differs).

    .venv/bin/python scripts/bench_mask_density.py --workdir bq --S 4 --densities 1,0.3,0.1,0.03
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sift.adapters import Adapter, DenseDelta, load_adapter  # noqa: E402
from sift.builtin.general import general_rows  # noqa: E402
from sift.determinism import quiet_libraries  # noqa: E402
from sift.evaluation.recall import fact_recall, general_recall  # noqa: E402
from sift.merge.state import MergeState  # noqa: E402
from sift.models import LazyBase  # noqa: E402
from sift.serving.generate import greedy_answers  # noqa: E402
from sift.siftmasks.tune import keep_largest  # noqa: E402
from sift.workspace import Workspace  # noqa: E402
from sift.workspace.rows import read_manifest  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a bench_quality.py work folder with sift-masks workspaces")
    ap.add_argument("--S", type=int, default=4)
    ap.add_argument("--densities", default="1,0.3,0.1,0.03")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    quiet_libraries()
    work = Path(args.workdir)
    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    ws = Workspace(work / f"ws-S{args.S}-sift-masks")
    cfg, state = ws.load_config(), ws.load_state()
    manifest = read_manifest(ws)
    owner_shard = [manifest[r["id"]] for r in rows]
    shards = sorted(set(owner_shard))
    base = LazyBase(cfg.model.name, cfg.model.revision, state.base_model_fingerprint).get()
    model, tok = base.model, base.tokenizer
    params = dict(model.named_parameters())
    stored = {s: load_adapter(ws.adapter_dir(s), s) for s in shards}
    names = sorted(stored[shards[0]].modules)
    w0 = {n: params[n].detach().clone() for n in names}
    general = general_rows()

    def answer(weights: dict[str, torch.Tensor], prompts: list[str]) -> list[str]:
        with torch.no_grad():
            for n, v in weights.items():
                params[n].copy_(v)
        return greedy_answers(model, tok, prompts, args.max_new_tokens, batch_size=args.batch_size)

    results = []
    for density in [float(x) for x in args.densities.split(",")]:
        cut = {
            s: Adapter(
                s, f"cut-{s}", 1.0, {n: DenseDelta(keep_largest(f.delta, density)) for n, f in a.modules.items()}
            )
            for s, a in stored.items()
        }
        sums = MergeState(cfg.merge.fixed_point_bits, "bench", counts=True)
        for s in shards:
            sums.add(cut[s])
        masks = {s: {n: f.delta != 0 for n, f in cut[s].modules.items()} for s in shards}
        share = sum(int(m.sum()) for ms in masks.values() for m in ms.values()) / sum(
            m.numel() for ms in masks.values() for m in ms.values()
        )
        row = {"S": args.S, "density": density, "mask_share": round(share, 4)}
        for path in ("alone", "sift-masks", "coordinate"):
            log(f"density {density}: {path}")
            trained, para = ["?"] * len(rows), ["?"] * len(rows)
            for s in shards:
                idx = [i for i, o in enumerate(owner_shard) if o == s]
                if path == "alone":
                    weights = {n: w0[n] + cut[s].modules[n].delta for n in names}
                else:
                    sums.counts = path == "coordinate"
                    weights = sums.served_weights(w0, 1.0 / len(shards), masks=masks[s])
                got = answer(weights, [rows[i]["prompt"] for i in idx] + [rows[i]["paraphrased_prompt"] for i in idx])
                for k, i in enumerate(idx):
                    trained[i], para[i] = got[k], got[len(idx) + k]
            row[path] = {
                "trained": fact_recall(trained, rows)["contains"],
                "paraphrased": fact_recall(para, rows, paraphrased=True)["contains"],
            }
        for path, counts in (("merged sum/T", False), ("merged sum/count", True)):
            log(f"density {density}: {path}")
            sums.counts = counts
            weights = sums.served_weights(w0, 1.0 / len(shards))
            got = answer(weights, [r["prompt"] for r in rows] + [g["prompt"] for g in general])
            row[path] = {
                "trained": fact_recall(got[: len(rows)], rows)["contains"],
                "general": general_recall(got[len(rows) :], general)["correct"],
            }
        results.append(row)
        print(json.dumps(row), flush=True)
    with torch.no_grad():  # the base back as it was
        for n, v in w0.items():
            params[n].copy_(v)
    (work / f"mask-density-S{args.S}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
