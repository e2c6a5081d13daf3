"""`sift compare --seeds N`: the NeurIPS 2023 unlearning challenge's forgetting score, on LMs.

Per forget row, each model gives one number, the LM analogue of the challenge's logit-scaled
confidence: f = log p - log(1 - p) with p = exp(-mean answer-token NLL) the row's length-normalised
answer probability (its Q_A_Prob; EOS included). The estimator's thresholds are a grid in absolute
units (0.01), so the statistic must spread over many of them; the logit does, where the mean NLL
alone moves by hundredths of a nat between seeds. The challenge's estimator (sift.evaluation.challenge) compares the N
unlearned models' numbers with the N references' per row, turns the best threshold attack's
(epsilon, delta = 1e-5) into a score per row and averages it into F.

Seeds vary from run to run, as in the challenge: a reference is a model retrained without the
forget rows with its own training seed (it changes the LoRA initialisation and the data order);
an approximate method's runs all start from the one original model and differ in their unlearning
seed (forget order, retain batches); the exact path's runs are sharded workspaces trained with
their own seeds and then `sift forget`, against sharded rebuilds with other seeds.

Finite samples keep F well below 1 even for two samples of one distribution, so the report puts
beside every F its ceiling: F of one set of references against a second, independently seeded
set. Final score = F x (retain utility ratio) x (held-out utility ratio), with retain utility the
mean retain_Q_A_Prob and held-out utility the mean wf_Q_A_Prob_normalised (general knowledge no
model was tuned on; the challenge used test accuracy), each averaged over the N models.

Every model's numbers go through sift.evaluation.statscache: with --seeds-cache they are kept on
disk as soon as they are known, so a cut run resumes and a larger N reuses the first models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sift.evaluation import metrics as M
from sift.evaluation.likelihood import score_answers


def model_stats(
    model: Any,
    tok: Any,
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    general: list[dict[str, Any]],
    batch_size: int,
) -> dict[str, Any]:
    """(per forget row statistic, retain utility, held-out utility) of one model."""
    f = score_answers(model, tok, [(r["prompt"], r["completion"]) for r in forget], batch_size)
    rt = score_answers(model, tok, [(r["prompt"], r["completion"]) for r in retain], batch_size)
    pairs = [(r["prompt"], a) for r in general for a in [r["completion"], *r["perturbed_completions"]]]
    g = score_answers(model, tok, pairs, batch_size) if pairs else []
    wf, i = [], 0
    for r in general:
        k = 1 + len(r["perturbed_completions"])
        wf.append(M.prob_normalised(g[i].avg_loss, [x.avg_loss for x in g[i + 1 : i + k]]))
        i += k
    return {
        "stat": [_logit_confidence(x.avg_loss) for x in f],
        "retain": float(np.mean([M.prob(x.avg_loss) for x in rt])),
        "heldout": float(np.mean(wf)) if wf else 1.0,
    }


def _logit_confidence(avg_loss: float) -> float:
    """log p - log(1 - p) for p = exp(-avg_loss), computed stably: -avg_loss - log(-expm1(-avg_loss))."""
    return -avg_loss - float(np.log(-np.expm1(-max(avg_loss, 1e-12))))


def _routed_stats(
    server: Any,
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    general: list[dict[str, Any]],
    batch_size: int,
) -> dict[str, Any]:
    """model_stats on a workspace's routed serving: each row scored by the model that serves it."""
    from sift.evaluation.targets import WorkspaceTarget

    target = WorkspaceTarget("routed", server)
    items = [("f", r) for r in forget] + [("r", r) for r in retain] + [("g", r) for r in general]
    parts: dict[int, dict[str, Any]] = {}
    for model, tok, idx in target.groups([r["prompt"] for _, r in items]):
        sub = [items[i] for i in idx]
        st = model_stats(
            model,
            tok,
            [r for k, r in sub if k == "f"],
            [r for k, r in sub if k == "r"],
            [r for k, r in sub if k == "g"],
            batch_size,
        )
        parts[len(parts)] = {
            "idx": idx,
            **st,
            "n_r": sum(k == "r" for k, _ in sub),
            "n_g": sum(k == "g" for k, _ in sub),
        }
    stat = [0.0] * len(forget)
    for p in parts.values():
        f_idx = [i for i in p["idx"] if items[i][0] == "f"]
        for i, v in zip(f_idx, p["stat"]):
            stat[i] = v
    n_r = sum(p["n_r"] for p in parts.values()) or 1
    n_g = sum(p["n_g"] for p in parts.values()) or 1
    return {
        "stat": stat,
        "retain": sum(p["retain"] * p["n_r"] for p in parts.values() if p["n_r"]) / n_r,
        "heldout": sum(p["heldout"] * p["n_g"] for p in parts.values() if p["n_g"]) / n_g,
    }


def score_sets(unlearned: list[dict[str, Any]], references: list[dict[str, Any]]) -> dict[str, Any]:
    from sift.evaluation.challenge import bootstrap_interval, final_score, forget_score

    u = np.array([m["stat"] for m in unlearned], dtype=np.float64).T  # [rows, N]
    r = np.array([m["stat"] for m in references], dtype=np.float64).T
    F = forget_score(u, r)["F"]
    lo, hi = bootstrap_interval(u, r)
    final = final_score(
        F,
        np.mean([m["retain"] for m in unlearned]),
        np.mean([m["retain"] for m in references]),
        np.mean([m["heldout"] for m in unlearned]),
        np.mean([m["heldout"] for m in references]),
    )
    return {"F": float(F), "interval": [float(lo), float(hi)], "final": float(final)}


def challenge_scores(
    rows: list[dict[str, Any]],
    remaining: list[dict[str, Any]],
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    general: list[dict[str, Any]],
    mono: Any,
    s: Any,
    folder: Path,
    base: Any,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    from safetensors.torch import load_file

    from sift.adapters import open_peft_adapter, weights_file
    from sift.compute import base_stack
    from sift.config import config_to_toml
    from sift.evaluation.builds import build_trained, recipe_config
    from sift.evaluation.challenge import BIN_WIDTH, bin_count
    from sift.evaluation.statscache import StatsCache
    from sift.exact.forget import forget as do_forget
    from sift.hashing import tensors_sha256
    from sift.serving.answer import WorkspaceServer
    from sift.unlearn.run import UnlearnSettings, unlearn

    n, bs = s.seeds, s.eval.batch_size
    b = base.get()
    forget_ids = sorted(r["id"] for r in forget)
    stack = base_stack(base, torch.get_num_threads())  # device, libraries, dtype, threads: the bytes depend on them
    stack.pop("driver", None)  # a driver update alone changes no kernel's result
    cache = StatsCache(
        Path(s.seeds_cache) if s.seeds_cache else None,
        {
            "stack": stack,
            "base": b.fingerprint,
            "rows": rows,
            "forget": forget_ids,
            "retain": retain,
            "general": general,
            "batch_size": bs,
        },
    )

    def adapter_stats(adapter_dir: Path) -> dict[str, Any]:
        model = open_peft_adapter(b.model, adapter_dir).eval()
        return model_stats(model, b.tokenizer, forget, retain, general, bs)

    def trained(name: str, on: str, cfg: Any, then_forget: bool = False) -> dict[str, Any]:
        """The numbers of one model trained from scratch on `on` ("all" rows or the "remaining"
        ones; sharded ones served routed, after a forget with then_forget), cached."""
        data = rows if on == "all" else remaining

        def compute() -> dict[str, Any]:
            sharded = cfg.shards.num_shards > 1
            ws, _ = build_trained(folder / name, data, cfg, merge=sharded)
            if then_forget:
                do_forget(ws, forget_ids, base=base, quiet=True)
            if not sharded:
                return adapter_stats(ws.adapter_dir(0))
            return _routed_stats(WorkspaceServer(ws, base=base), forget, retain, general, bs)

        inputs = {"recipe": config_to_toml(cfg), "rows": on, "forget": then_forget}
        return cache.get(name, inputs, compute)

    refs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    for side, offset in (("a", 100), ("b", 200)):
        for i in range(1, n + 1):
            progress(f"seeds: monolithic reference {side}{i}/{n} (seed {offset + i})")
            refs[side].append(trained(f"mono-ref-{side}{i}", "remaining", recipe_config(s, 1, seed=offset + i)))
    rows_out = [{"method": "reference vs reference (monolithic)", **score_sets(refs["a"], refs["b"])}]
    ceiling_mono = rows_out[0]["F"]

    # what every run starts from: the original's weights and its recipe (LoRA scale, max_length)
    original = tensors_sha256(load_file(str(weights_file(mono.adapter_dir(0)))))[0]
    original_recipe = config_to_toml(recipe_config(s, 1))
    for method in s.methods:
        runs = []
        for i in range(1, n + 1):
            progress(f"seeds: {method} run {i}/{n} (unlearning seed {i})")
            out = folder / "unlearned" / f"{method}-{i}"
            settings = UnlearnSettings(method=method, epochs=s.unlearn_epochs, lr=s.unlearn_lr, seed=i)

            def compute(out: Path = out, settings: UnlearnSettings = settings) -> dict[str, Any]:
                unlearn(mono, forget_ids, out, settings, base=base, quiet=True)
                return adapter_stats(out)

            inputs = {"original": original, "original_recipe": original_recipe, "unlearn": asdict(settings)}
            runs.append(cache.get(f"{method}-{i}", inputs, compute))
        rows_out.append({"method": method, **score_sets(runs, refs["a"]), "ceiling": ceiling_mono})

    exact, shard_refs = [], {"a": [], "b": []}
    for i in range(1, n + 1):
        progress(f"seeds: exact path {i}/{n} (sharded, seed {300 + i}, then sift forget)")
        exact.append(trained(f"exact-{i}", "all", recipe_config(s, s.num_shards, seed=300 + i), then_forget=True))
    for side, offset in (("a", 400), ("b", 500)):
        for i in range(1, n + 1):
            progress(f"seeds: sharded reference {side}{i}/{n} (seed {offset + i})")
            cfg = recipe_config(s, s.num_shards, seed=offset + i)
            shard_refs[side].append(trained(f"shard-ref-{side}{i}", "remaining", cfg))
    ceiling_shard = score_sets(shard_refs["a"], shard_refs["b"])
    rows_out.append({"method": "reference vs reference (sharded)", **ceiling_shard, "ceiling": ceiling_shard["F"]})
    rows_out.append(
        {"method": "exact: sift forget (routed)", **score_sets(exact, shard_refs["a"]), "ceiling": ceiling_shard["F"]}
    )
    rows_out[0]["ceiling"] = ceiling_mono
    return {
        "n_models": n,
        "statistic": "logit-scaled confidence log p - log(1 - p), p = exp(-mean answer-token NLL) of the forget row's completion",
        "delta": 1e-5,
        "bins": {"width": BIN_WIDTH, "count": bin_count(n), "max_epsilon": math.ceil(math.log(n - 1))},
        "note": (
            f"N = {n} models per side, seeds varied run to run. Per forget row and model the statistic is the "
            "logit-scaled confidence log p - log(1 - p), p = exp(-mean answer-token NLL); threshold attacks on it give "
            f"epsilon at delta = 1e-5, scored in bins of width {BIN_WIDTH} up to ceil(ln(N - 1)) = "
            f"{math.ceil(math.log(n - 1))} ({bin_count(n)} bins: 1, 1/2, 1/4, ...; beyond the last, 0), as the organisers' "
            "code defines them. F of two independently seeded sets of references is the "
            "ceiling a method can reach with this N (finite samples keep it below 1). Final = F x retain utility ratio "
            "(mean retain_Q_A_Prob) x held-out utility ratio (mean wf_Q_A_Prob_normalised), unlearned over reference."
        ),
        "rows": rows_out,
        **(
            {"cache": {"folder": s.seeds_cache, "reused": len(cache.reused), "computed": len(cache.computed)}}
            if s.seeds_cache
            else {}
        ),
    }
