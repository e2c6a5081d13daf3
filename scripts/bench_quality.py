#!/usr/bin/env python3
"""What each serving path recalls, on the builtin model and data: the monolithic adapter (S = 1)
against S shard adapters served merged (mean, task arithmetic at its best scale, TIES), routed to
the owner's shard (oracle), routed by each data-local router with no group id, and the merged
model on what no router claims; then SIFT-Masks shards (sign-fixed full fine-tuning): each
shard alone (theta0 + tau_c, the reference its masked serving is measured against), served
merged without a mask, with the owner's local mask (oracle) and with the mask a router picks,
for the paper's merge (sum/T) and sift's per-coordinate variant (sum/count). All measured in one
run, numbers as they come.

    .venv/bin/python scripts/bench_quality.py                      # 32 people, S = 4,16,32
    .venv/bin/python scripts/bench_quality.py --people 8 --shards 4 --workdir bq
    .venv/bin/python scripts/bench_quality.py --json > quality.json
    .venv/bin/python scripts/bench_quality.py --check-general      # the base on the general set

Columns (per path and S):
- trained / paraphrased: recall of the trained questions and of their paraphrases, exact and
  contains (sift.evaluation.recall.fact_recall);
- route acc: share of fact questions (trained, paraphrased) sent to the owner's shard;
- general: share of the general-knowledge questions (sift.builtin.general) answered correctly;
  the untrained base answers all of them, so this is what the path keeps of the base;
- s/answer: seconds per answer (routing plus the generation time of the batch it was answered
  in, divided by the batch size);
- route B/shard: bytes the router stores per non-empty shard (its file plus router.json);
- stored B/shard: bytes of each shard's trained tensors (LoRA adapter; SIFT-Masks mask + delta);
- train s: training time of the workspace (all shards; routers included).

Answers are greedy, batched 16 at a time with left padding (`--batch-size`). Every answer is
cached in the work folder (answers.json), keyed by (S, model, question), so an interrupted run
resumes where it stopped and a routed path reuses the answers its chosen shard already gave.
Hours on 2 CPU cores at the default size: it trains every workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sift.adapters import weights_file  # noqa: E402
from sift.builtin.facts import make_rows  # noqa: E402
from sift.builtin.general import GENERAL_QUESTIONS, general_rows  # noqa: E402
from sift.config import ROUTERS, SiftConfig  # noqa: E402
from sift.determinism import quiet_libraries  # noqa: E402
from sift.evaluation.recall import fact_recall, general_correct, general_recall  # noqa: E402
from sift.fsio import atomic_write_bytes  # noqa: E402
from sift.merge.driver import merge_workspace  # noqa: E402
from sift.models import LazyBase, load_base_model  # noqa: E402
from sift.routing.routers import EMBED_FILE, KEYS_FILE, ROUTER_META  # noqa: E402
from sift.serving.answer import WorkspaceServer  # noqa: E402
from sift.serving.generate import greedy_answers  # noqa: E402
from sift.train import train_shards  # noqa: E402
from sift.workspace import Workspace  # noqa: E402
from sift.workspace.create import create_workspace  # noqa: E402
from sift.workspace.rows import read_manifest  # noqa: E402

ROUTER_FILES = {"keys": KEYS_FILE, "embed": EMBED_FILE}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class AnswerCache:
    """(S, model key, prompt) -> (answer, seconds of generation attributed to it), on disk."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, list[Any]] = json.loads(path.read_text()) if path.exists() else {}

    @staticmethod
    def key(S: int, model: str, prompt: str) -> str:
        return f"{S}\t{model}\t{prompt}"

    def missing(self, S: int, model: str, prompts: list[str]) -> list[str]:
        return sorted({p for p in prompts if self.key(S, model, p) not in self.data})

    def get(self, S: int, model: str, prompt: str) -> tuple[str, float]:
        answer, seconds = self.data[self.key(S, model, prompt)]
        return answer, seconds

    def fill(self, S: int, model: str, prompts: list[str], answer_fn, batch_size: int) -> None:
        """Answer the prompts not cached yet, a batch at a time, saving after each batch."""
        todo = self.missing(S, model, prompts)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            t0 = time.perf_counter()
            answers = answer_fn(chunk)
            per = (time.perf_counter() - t0) / len(chunk)
            for p, a in zip(chunk, answers):
                self.data[self.key(S, model, p)] = [a, per]
            atomic_write_bytes(self.path, json.dumps(self.data, sort_keys=True).encode())


def make_config(args: argparse.Namespace, S: int) -> SiftConfig:
    cfg = SiftConfig()
    cfg.model.name = args.model
    cfg.shards.num_shards = S
    cfg.data.group_by = "owner"
    if args.epochs:
        cfg.train.epochs = args.epochs
    if args.min_steps:
        cfg.train.min_steps = args.min_steps
    if args.sift_masks_lr:
        cfg.sift_masks.lr = args.sift_masks_lr
    if args.mask_density:
        cfg.sift_masks.density = args.mask_density
    if args.lr:
        cfg.train.lr = args.lr
    if args.train_batch_size:  # e.g. a shard's whole row count: the paper's full-batch recipe
        cfg.train.batch_size = args.train_batch_size
    if args.lora_r:  # the LoRA rank, also B's columns in sift-masks' LoRA form
        cfg.lora.r = args.lora_r
        cfg.lora.alpha = float(args.lora_alpha or 2 * args.lora_r)  # alpha / r stays 2, as the default's 32 / 16
    elif args.lora_alpha:
        cfg.lora.alpha = float(args.lora_alpha)
    if args.mask_targets:
        cfg.sift_masks.target_modules = [m for m in args.mask_targets.split(",") if m]
    cfg.sift_masks.form = args.mask_form
    return cfg


RECIPE_ARGS = (
    "people", "model", "epochs", "min_steps", "sift_masks_lr", "mask_density", "mask_form",
    "lr", "train_batch_size", "lora_r", "lora_alpha", "mask_targets", "max_new_tokens",
    "batch_size",  # answers are cached by prompt; the padding of a batch can change them
)  # fmt: skip


def check_recipe(work: Path, args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """A resumed --workdir must be asked for the recipe it was made with: its workspaces and its
    answer cache are keyed by S alone, so another recipe would silently reuse the old shards."""
    recipe = {k: getattr(args, k) for k in RECIPE_ARGS}
    path = work / "recipe.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in recipe.items() if before.get(k) != v}
        if changed:
            ap.error(
                f"{work} was made with another recipe ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                "use another --workdir"
            )
    elif any(work.glob("ws-S*")):
        ap.error(f"{work} holds workspaces but no recipe.json (made before the check): use another --workdir")
    else:
        path.write_text(json.dumps(recipe, indent=2) + "\n")


def score(
    answers: list[str], seconds: list[float], rows: list[dict], general: list[dict], n_facts: int
) -> dict[str, Any]:
    """answers/seconds are laid out as [trained facts, paraphrased facts, general questions]."""
    t, p, g = answers[:n_facts], answers[n_facts : 2 * n_facts], answers[2 * n_facts :]
    out: dict[str, Any] = {
        "trained": fact_recall(t, rows),
        "paraphrased": fact_recall(p, rows, paraphrased=True),
        "general": general_recall(g, general) if general else None,
        "seconds_per_answer": round(sum(seconds) / max(1, len(seconds)), 4),
    }
    return out


def check_general(model_name: str, batch_size: int) -> None:
    """Ask the untrained base every general question and print which it answers correctly."""
    base = load_base_model(model_name)
    prompts = [q for _, q, _ in GENERAL_QUESTIONS]
    answers = greedy_answers(base.model, base.tokenizer, prompts, 32, batch_size=batch_size)
    right = 0
    for (qid, q, acc), a in zip(GENERAL_QUESTIONS, answers):
        ok = general_correct(a, list(acc))
        right += ok
        print(f"{'ok ' if ok else 'BAD'} {qid:<20} {q!r} -> {a!r}")
    print(f"{right}/{len(prompts)} answered correctly by the untrained base")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--people", type=int, default=32)
    ap.add_argument(
        "--shards", default="4,16,32", help="comma-separated shard counts (the monolithic S = 1 is always run)"
    )
    ap.add_argument(
        "--scales",
        default="0.25,0.5,1.0",
        help="task-arithmetic scales tried; the best on trained questions is reported",
    )
    ap.add_argument("--routers", default=",".join(ROUTERS), help="routers to measure")
    ap.add_argument("--epochs", type=int, default=None, help="override the default training recipe's epochs")
    ap.add_argument("--min-steps", type=int, default=None, help="train.min_steps: a floor on each shard's steps")
    ap.add_argument("--sift-masks-lr", type=float, default=None, help="override sift_masks.lr")
    ap.add_argument("--mask-density", type=float, default=None, help="sift_masks.density: share of entries kept")
    ap.add_argument("--lr", type=float, default=None, help="train.lr of the LoRA rows (the gentler-recipe frontier)")
    ap.add_argument("--train-batch-size", type=int, default=None, help="train.batch_size (default 8)")
    ap.add_argument("--lora-r", type=int, default=None, help="lora.r (alpha follows as 2r unless --lora-alpha)")
    ap.add_argument("--lora-alpha", type=float, default=None, help="lora.alpha")
    ap.add_argument(
        "--mask-targets",
        default=None,
        help="sift_masks.target_modules, comma-separated (default down_proj), e.g. down_proj,up_proj,gate_proj",
    )
    ap.add_argument(
        "--mask-form",
        choices=("dense", "lora"),
        default="dense",
        help="sift_masks.form of the sift-masks rows: dense (the paper's) or lora (sift's LoRA form, merged with sift-masks-lora[-coordinate])",
    )
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--batch-size", type=int, default=16, help="questions answered per generate() call")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--workdir", default=None, help="keep workspaces and the answer cache here (resumable); default: a temp folder"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object: a row per (path, S)")
    ap.add_argument("--check-general", action="store_true", help="only ask the base the general questions")
    ap.add_argument(
        "--methods",
        default="lora,sift-masks",
        help="training methods measured: lora (S = 1 and each S), sift-masks (each S)",
    )
    ap.add_argument(
        "--no-ties", dest="ties", action="store_false", help="skip the TIES merge rows of the LoRA workspaces"
    )
    args = ap.parse_args()
    quiet_libraries()
    if args.check_general:
        check_general(args.model, args.batch_size)
        return

    rows = make_rows(people=args.people)
    general = general_rows()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sift-bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    check_recipe(work, args, ap)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = AnswerCache(work / "answers.json")
    trained_q = [r["prompt"] for r in rows]
    para_q = [r["paraphrased_prompt"] for r in rows]
    general_q = [g["prompt"] for g in general]
    all_q = trained_q + para_q + general_q
    n = len(rows)
    routers = [r for r in args.routers.split(",") if r]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - {"lora", "sift-masks"})
    if unknown:
        ap.error(f"unknown method(s) {unknown}: use lora, sift-masks")
    results: list[dict[str, Any]] = []
    base: LazyBase | None = None
    timings: dict[str, Any] = {}

    def answer_all(S: int, key: str, prompts: list[str], fn) -> tuple[list[str], list[float]]:
        cache.fill(S, key, prompts, fn, args.batch_size)
        got = [cache.get(S, key, p) for p in prompts]
        return [a for a, _ in got], [s for _, s in got]

    def gen(model, tok):
        return lambda chunk: greedy_answers(model, tok, chunk, args.max_new_tokens, batch_size=len(chunk))

    def save_report() -> dict[str, Any]:
        machine = {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "threads": __import__("torch").get_num_threads(),
        }
        report = {
            "people": args.people,
            "facts": n,
            "general_questions": len(general),
            "model": args.model,
            "machine": machine,
            "results": results,
        }
        (work / "results.json").write_text(
            json.dumps(report, indent=2)
        )  # after every S: a cut run keeps what it measured
        return report

    def prepare(S: int, method: str) -> tuple[Workspace, dict[str, Any], list[int], list[int]]:
        """Create and train the workspace (resumable); returns it, the columns common to its rows,
        each question's owner shard and the non-empty shards."""
        nonlocal base
        cfg = make_config(args, S)
        cfg.train.method = method
        tag = method if method == "lora" or args.mask_form == "dense" else f"{method}-lora-form"
        ws = Workspace(work / (f"ws-S{S}" if method == "lora" else f"ws-S{S}-{tag}"))
        if not ws.exists():
            create_workspace(ws, str(data), cfg)
        base = base or LazyBase(cfg.model.name, cfg.model.revision, ws.load_state().base_model_fingerprint)
        log(f"S={S} {method}: training")
        summary = train_shards(ws, base=base, quiet=True)
        timing_file = work / (f"train-S{S}.json" if method == "lora" else f"train-S{S}-{tag}.json")
        if summary["trained"]:  # time of the run that trained it (a resumed run keeps the first's)
            timing_file.write_text(json.dumps({"seconds": summary["seconds"], "steps": summary["steps"]}))
        train = json.loads(timing_file.read_text()) if timing_file.exists() else {"seconds": None, "steps": None}
        manifest = read_manifest(ws)
        owner_shard = [manifest[r["id"]] for r in rows]
        nonempty = sorted(set(owner_shard))
        stored = [weights_file(ws.adapter_dir(s)).stat().st_size for s in nonempty]  # type: ignore[union-attr]
        common = {
            "S": S,
            "method": method,
            "nonempty_shards": len(nonempty),
            "train_seconds": train["seconds"],
            "train_steps": train["steps"],
            "stored_bytes_per_shard": round(sum(stored) / len(stored)),
        }
        return ws, common, owner_shard, nonempty

    def shard_rows(
        S: int,
        ws: Workspace,
        server: WorkspaceServer,
        prefix: str,
        label: str,
        fallback: str,
        common: dict[str, Any],
        owner_shard: list[int],
        nonempty: list[int],
    ) -> None:
        """Rows for answering from one shard: the owner's (oracle), then each router's choice with
        `fallback` (a cached merged model key) answering what it leaves unclaimed."""

        def shard_answers(shard: int, prompts: list[str]) -> None:
            def fn(chunk: list[str]) -> list[str]:
                return [
                    x.answer
                    for x in server.answer(
                        chunk, shard=shard, max_new_tokens=args.max_new_tokens, batch_size=len(chunk)
                    )
                ]

            cache.fill(S, f"{prefix}shard-{shard}", prompts, fn, args.batch_size)

        log(f"S={S}: {label}owner's shard (oracle routing)")
        for shard in nonempty:
            shard_answers(shard, [q for qs in (trained_q, para_q) for q, s in zip(qs, owner_shard) if s == shard])
        got = [cache.get(S, f"{prefix}shard-{s}", q) for q, s in zip(trained_q + para_q, owner_shard + owner_shard)]
        results.append(
            {
                "path": f"{label}routed: owner's shard (oracle, group given)",
                **common,
                **score([a for a, _ in got], [t for _, t in got], rows, [], n),
                "route_accuracy": {"trained": 1.0, "paraphrased": 1.0},
            }
        )

        for name in routers:
            log(f"S={S}: {label}router {name}")
            t0 = time.perf_counter()
            decisions = server.route(all_q, name)
            route_s = (time.perf_counter() - t0) / len(all_q)
            chosen = [d.shard for d in decisions]
            for shard in sorted({c for c in chosen if c is not None}):
                shard_answers(shard, [q for q, c in zip(all_q, chosen) if c == shard])
            ans, sec = [], []
            for q, c in zip(all_q, chosen):
                a, s_ = cache.get(S, fallback if c is None else f"{prefix}shard-{c}", q)
                ans.append(a)
                sec.append(s_ + route_s)
            acc = {
                k: sum(c == s for c, s in zip(chosen[i * n : (i + 1) * n], owner_shard)) / n
                for i, k in enumerate(("trained", "paraphrased"))
            }
            sizes = [
                sum((ws.adapter_dir(s) / f).stat().st_size for f in (ROUTER_FILES[name], ROUTER_META)) for s in nonempty
            ]
            unclaimed = {
                k: sum(c is None for c in chosen[i * n : (i + 1) * n])
                for i, k in enumerate(("trained", "paraphrased", "general"))
            }
            results.append(
                {
                    "path": f"{label}routed: {name} router (no group id)",
                    **common,
                    **score(ans, sec, rows, general, n),
                    "route_accuracy": acc,
                    "unclaimed": unclaimed,
                    "router_bytes_per_shard": round(sum(sizes) / len(sizes)),
                    "route_seconds_per_prompt": round(route_s, 4),
                }
            )
            # the same routing with the untrained base answering what the router leaves unclaimed
            # (serving.fallback = "base"): the base holds no data, so this is exact too
            if cache.missing(0, "base", all_q) == []:
                ans_b, sec_b = [], []
                for q, c in zip(all_q, chosen):
                    a, s_ = cache.get(0, "base", q) if c is None else cache.get(S, f"{prefix}shard-{c}", q)
                    ans_b.append(a)
                    sec_b.append(s_ + route_s)
                results.append(
                    {
                        "path": f"{label}routed: {name} router, base answers the unclaimed",
                        **common,
                        **score(ans_b, sec_b, rows, general, n),
                        "route_accuracy": acc,
                        "unclaimed": unclaimed,
                    }
                )
            # the merged model on the requests this router leaves unclaimed
            idx_t = [i for i in range(n) if chosen[i] is None]
            idx_p = [i for i in range(n) if chosen[n + i] is None]
            idx_g = [i for i in range(len(general)) if chosen[2 * n + i] is None]
            m = {k: cache.get(S, fallback, q) for k, q in enumerate(all_q)}
            results.append(
                {
                    "path": f"{label}merged: what the {name} router leaves unclaimed",
                    **common,
                    "trained": fact_recall([m[i][0] for i in idx_t], [rows[i] for i in idx_t]),
                    "paraphrased": fact_recall(
                        [m[n + i][0] for i in idx_p], [rows[i] for i in idx_p], paraphrased=True
                    ),
                    "general": general_recall([m[2 * n + i][0] for i in idx_g], [general[i] for i in idx_g]),
                    "seconds_per_answer": round(
                        sum(m[i][1] for i in idx_t + [n + j for j in idx_p] + [2 * n + j for j in idx_g])
                        / max(1, len(idx_t) + len(idx_p) + len(idx_g)),
                        4,
                    ),
                }
            )

    def alone_rows(S: int, ws: Workspace, common: dict[str, Any], owner_shard: list[int], nonempty: list[int]) -> None:
        """Each SIFT-Masks shard's own model theta0 + tau_c on its owners' questions: what its
        masked serving is measured against (the paper's 'individual task' reference)."""
        from sift.adapters import load_adapter

        b = base.get()  # type: ignore[union-attr]
        cfg = ws.load_config()
        lora_form = cfg.sift_masks.form == "lora"
        for shard in nonempty:
            key = f"sml-alone-{shard}" if lora_form else f"sm-alone-{shard}"
            prompts = [q for qs in (trained_q, para_q) for q, s in zip(qs, owner_shard) if s == shard]
            if cache.missing(S, key, prompts):
                deltas = load_adapter(ws.adapter_dir(shard), shard).modules
                params = dict(b.model.named_parameters())
                saved = {name: params[name].detach().clone() for name in deltas}
                try:
                    with __import__("torch").no_grad():
                        for name, f in deltas.items():
                            if lora_form:  # tau_c = s * B_c @ A
                                from sift.siftmasks.lowrank import frozen_a, lowrank_product

                                a = frozen_a(name, cfg.lora.r, params[name].shape[1], cfg.sift_masks.sign_seed)
                                tau = lowrank_product(f.delta, a).mul_(cfg.lora.alpha / cfg.lora.r)
                            else:
                                tau = f.delta
                            params[name].add_(tau.to(params[name].dtype))
                    cache.fill(S, key, prompts, gen(b.model, b.tokenizer), args.batch_size)
                finally:
                    with __import__("torch").no_grad():
                        for name, value in saved.items():
                            params[name].copy_(value)
        prefix = "sml" if lora_form else "sm"
        got = [cache.get(S, f"{prefix}-alone-{s}", q) for q, s in zip(trained_q + para_q, owner_shard + owner_shard)]
        results.append(
            {
                "path": "sift-masks"
                + (" (LoRA form)" if lora_form else "")
                + ": each shard alone (base + tau_c, owner's questions)",
                **common,
                **score([a for a, _ in got], [t for _, t in got], rows, [], n),
            }
        )

    shard_counts = [int(s) for s in args.shards.split(",") if s and int(s) != 1]
    for S in ([1] + shard_counts) if "lora" in methods else []:
        ws, common, owner_shard, nonempty = prepare(S, "lora")
        b = base.get()  # type: ignore[union-attr]
        if S == 1:
            ans, sec = answer_all(0, "base", all_q, gen(b.model, b.tokenizer))
            results.append({"path": "base model, untrained", "S": 0, **score(ans, sec, rows, general, n)})

        merge_workspace(ws, method="mean", base=base)
        server = WorkspaceServer(ws, base=base)
        merged_model, merged_tok, _ = server.merged_model()
        log(f"S={S}: merged mean")
        ans, sec = answer_all(S, "mean", all_q, gen(merged_model, merged_tok))
        label = "monolithic adapter (all rows)" if S == 1 else "merged: mean"
        results.append({"path": label, **common, **score(ans, sec, rows, general, n)})
        if S == 1:
            save_report()
            continue

        # task arithmetic: pick the best scale on trained questions, then score it fully
        best = None
        for scale in [float(x) for x in args.scales.split(",") if x]:
            merge_workspace(ws, method="task-arithmetic", scale=scale, base=base)
            model, tok = WorkspaceServer(ws, base=base).merged_model()[:2]
            log(f"S={S}: task-arithmetic x{scale:g}")
            a, _ = answer_all(S, f"ta-{scale:g}", trained_q, gen(model, tok))
            c = fact_recall(a, rows)["contains"]
            if best is None or c > best[1]:
                best = (scale, c)
        if best is not None:
            scale = best[0]
            merge_workspace(ws, method="task-arithmetic", scale=scale, base=base)
            model, tok = WorkspaceServer(ws, base=base).merged_model()[:2]
            ans, sec = answer_all(S, f"ta-{scale:g}", all_q, gen(model, tok))
            results.append(
                {
                    "path": f"merged: task-arithmetic x{scale:g} (best of {args.scales})",
                    **common,
                    "scale": scale,
                    **score(ans, sec, rows, general, n),
                }
            )
        if args.ties:
            if cache.missing(S, "ties", all_q):
                t0 = time.perf_counter()
                merge_workspace(ws, method="ties", base=base)
                (work / f"ties-S{S}.json").write_text(json.dumps({"merge_seconds": round(time.perf_counter() - t0, 1)}))
            log(f"S={S}: ties")
            model, tok = WorkspaceServer(ws, base=base).merged_model()[:2]
            ans, sec = answer_all(S, "ties", all_q, gen(model, tok))
            ties_s = (
                json.loads((work / f"ties-S{S}.json").read_text())["merge_seconds"]
                if (work / f"ties-S{S}.json").exists()
                else None
            )
            results.append(
                {
                    "path": "merged: ties (density 0.2, lambda 1)",
                    **common,
                    "merge_seconds": ties_s,
                    **score(ans, sec, rows, general, n),
                }
            )
        merge_workspace(ws, method="mean", base=base)  # what the routers fall back to
        shard_rows(S, ws, WorkspaceServer(ws, base=base), "", "", "mean", common, owner_shard, nonempty)
        timings[str(S)] = common["train_seconds"]
        save_report()

    for S in shard_counts if "sift-masks" in methods else []:
        ws, common, owner_shard, nonempty = prepare(S, "sift-masks")
        mask_ones = [
            json.loads((ws.adapter_dir(s) / "sift-meta.json").read_text()).get("mask_ones", 0) for s in nonempty
        ]
        tuned = json.loads((ws.adapter_dir(nonempty[0]) / "sift-meta.json").read_text()).get("tuned_weights", 1)
        common = {**common, "mask_density": round(sum(mask_ones) / len(mask_ones) / tuned, 4)}
        log(f"S={S}: sift-masks, each shard alone (theta0 + tau_c)")
        alone_rows(S, ws, common, owner_shard, nonempty)
        variants = (
            (
                ("sift-masks-lora", "sml-", "sift-masks-lora: "),
                ("sift-masks-lora-coordinate", "smlc-", "sift-masks-lora-coordinate: "),
            )
            if args.mask_form == "lora"
            else (("sift-masks", "sm-", "sift-masks: "), ("sift-masks-coordinate", "smc-", "sift-masks-coordinate: "))
        )
        for method, prefix, label in variants:
            merge_workspace(ws, method=method, base=base)
            server = WorkspaceServer(ws, base=base)
            model, tok, _ = server.merged_model()
            log(f"S={S}: {method} merged, no mask")
            ans, sec = answer_all(S, f"{prefix}merged", all_q, gen(model, tok))
            formula = "sum/count" if method.endswith("coordinate") else "sum/T"
            results.append(
                {"path": f"{label}merged, no mask (base + {formula})", **common, **score(ans, sec, rows, general, n)}
            )
            shard_rows(S, ws, server, prefix, label, f"{prefix}merged", common, owner_shard, nonempty)
            save_report()

    report = save_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print_table(report)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def print_table(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(
        f"\nServing quality: {report['people']} people x 10 facts ({report['facts']} trained questions, as many paraphrases), "
        f"{report['general_questions']} general questions; model {report['model']}; {m['cpus']} CPUs, torch {m['torch']}\n"
    )
    head = (
        "| S | shards | path | trained exact | trained contains | para exact | para contains | route acc (tr/para) "
        "| general | s/answer | route B/shard | stored B/shard | train s |"
    )
    print(head)
    print("|" + "|".join("---" for _ in head.strip("|").split("|")) + "|")
    for r in report["results"]:
        ra = r.get("route_accuracy")
        g = r.get("general")

        def cell(d: dict[str, Any], key: str, full: int) -> str:
            if d["n"] == 0:
                return "– (n=0)"
            return pct(d[key]) + ("" if d["n"] == full else f" (n={d['n']})")

        facts = report["facts"]
        cells = [
            str(r["S"]) if r["S"] else "–",
            str(r.get("nonempty_shards", "–")),
            r["path"],
            cell(r["trained"], "exact", facts),
            cell(r["trained"], "contains", facts),
            cell(r["paraphrased"], "exact", facts),
            cell(r["paraphrased"], "contains", facts),
            f"{pct(ra['trained'])} / {pct(ra['paraphrased'])}" if ra else "–",
            cell(g, "correct", report["general_questions"]) if g else "–",
            f"{r['seconds_per_answer']:.3f}",
            str(r.get("router_bytes_per_shard", "–")),
            str(r.get("stored_bytes_per_shard", "–")),
            str(r.get("train_seconds") or "–"),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
