"""`sift compare`: exact forgetting beside every approximate baseline, on one data set and one
forget set, each measured against the reference retrained without the forget rows.

What runs, in order (everything under OUT/work/, the report in OUT/):
1. sharded: the workspace (`--num-shards`, by `--group-by`), trained and merged (evaluated
   routed before the forget with `--sharded-original`);
2. monolithic: one adapter on every row (a 1-shard workspace), the model the approximate methods
   start from; evaluated (the original);
3. references, trained from scratch without the forget rows: the monolithic retrain (the reference
   of the approximate methods) and the sharded rebuild (the reference of the exact path);
4. exact: `sift forget` on the sharded workspace; evaluated routed and merged, and its served
   bytes are compared with the sharded rebuild's (they must be identical);
5. every baseline (`sift unlearn`) from the monolithic adapter, evaluated after every epoch.

Each model is evaluated once (sift.evaluation.run) and its forget_quality and privleak are taken
against its own kind's reference: approximate methods against the monolithic retrain, the
exact path against the sharded rebuild. Costs are wall seconds and estimated FLOPs of what it
took to produce the model: for the exact path the forget (retraining the affected shards and
re-merging), for a baseline its unlearning epochs, for a reference its full training.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sift.errors import SiftError
from sift.evaluation import metrics as M
from sift.evaluation.builds import build_trained, recipe_config
from sift.evaluation.run import (
    EvalSettings,
    against_reference,
    check_rows,
    check_unseen,
    evaluate,
    metric_table,
    sample_general,
    split_rows,
)
from sift.logs import get_logger

log = get_logger(__name__)

METHODS = ("ga", "graddiff", "npo", "simnpo", "ngdiff")  # the default baselines; --methods takes any registered one
VARIANT_KEYS = {
    "sam": "sam_rho",
    "mask": "mask",
    "mask_ratio": "mask_ratio",
    "l1": "l1",
    "prune": "prune",
    "coreset": "coreset",
    "beta": "beta",
    "gamma": "gamma",
    "forget_weight": "forget_weight",
    "retain_weight": "retain_weight",
}
FORGET_SETS = ("ids", "random", "worst-case")
TABLE_METRICS = M.COMPARE_TABLE  # the report's columns, from the metric registry


@dataclass
class CompareSettings:
    model: str = "builtin"
    num_shards: int = 8
    group_by: str | None = "owner"
    epochs: int | None = None  # training epochs (None: sift's default recipe)
    methods: tuple[str, ...] = METHODS
    unlearn_epochs: int = 3
    unlearn_lr: float = 1e-4
    seeds: int = 0  # > 0: the challenge's forgetting score with this many models per side
    # a folder keeping each seeded model's numbers, so a cut --seeds run resumes (sift.evaluation.statscache)
    seeds_cache: str | None = None
    sharded_original: bool = False  # also evaluate the sharded workspace before the forget
    variants: tuple[
        str, ...
    ] = ()  # more approximate runs, "method:key=value,...", e.g. "npo:sam=0.01", "graddiff:mask=wagle"
    relearn: bool = (
        False  # run the relearning attack on the originals, references, exact path and each run's last epoch
    )
    relearn_settings: Any = None  # sift.evaluation.relearn.RelearnSettings (None: its defaults)
    forget_set: str = "ids"  # ids (given) | random | worst-case (chosen among the rows, --size of them)
    size: int | None = None
    worst_case: Any = None  # sift.evaluation.worstcase.WorstCaseSettings overrides (None: defaults)
    eval: EvalSettings = field(
        default_factory=lambda: EvalSettings(max_new_tokens=48, retain_sample=15, general_sample=15)
    )

    def check(self) -> None:
        from sift.unlearn.methods import UNLEARN_METHODS
        from sift.unlearn.run import UnlearnSettings

        unknown = sorted(set(self.methods) - set(UNLEARN_METHODS))
        if unknown:
            raise SiftError(f"unknown method(s) {unknown}: use {', '.join(UNLEARN_METHODS)}")
        if self.num_shards < 2:
            raise SiftError(
                "--num-shards must be at least 2 (the exact path is sharded; the monolithic model is built anyway)"
            )
        if self.seeds < 0 or self.seeds in (1, 2):
            raise SiftError("--seeds must be 0 (off) or at least 3 (the challenge's bins need ceil(ln(N - 1)) > 0)")
        if self.seeds_cache is not None and not self.seeds:
            raise SiftError("--seeds-cache keeps the numbers of a --seeds run: give --seeds N too")
        for m in self.methods:
            UnlearnSettings(method=m, epochs=self.unlearn_epochs, lr=self.unlearn_lr).resolved()
        for v in self.variants:
            variant_settings(v, self.unlearn_epochs, self.unlearn_lr)
        if self.forget_set not in FORGET_SETS:
            raise SiftError(f"--forget-set must be one of {', '.join(FORGET_SETS)}; got {self.forget_set!r}")
        if self.forget_set != "ids" and (self.size is None or self.size < 1):
            raise SiftError(f"--forget-set {self.forget_set} needs --size K (how many rows to forget)")
        if self.relearn_settings is not None:
            self.relearn_settings.check()
        self.eval.check()


def variant_settings(spec: str, epochs: int, lr: float) -> Any:
    """UnlearnSettings from "method:key=value,...": keys sam, mask, mask_ratio, l1, prune, coreset,
    beta, gamma, forget_weight, retain_weight."""
    from sift.unlearn.run import UnlearnSettings

    method, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in VARIANT_KEYS:
            raise SiftError(f"variant {spec!r}: '{part}' is not key=value with a key among {', '.join(VARIANT_KEYS)}")
        field_name = VARIANT_KEYS[key.strip()]
        try:
            kwargs[field_name] = value.strip() if field_name == "mask" else float(value)
        except ValueError:
            raise SiftError(f"variant {spec!r}: {key} needs a number, got {value!r}") from None
    settings = UnlearnSettings(method=method.strip(), epochs=epochs, lr=lr, **kwargs)
    settings.resolved()
    return settings


def _log(msg: str) -> None:
    log.info(f"sift compare: {msg}")


def _adapter_target(label: str, base: Any, adapter_dir: Path, cost: dict[str, float]) -> Any:
    from sift.adapters import open_peft_adapter
    from sift.evaluation.targets import ModelTarget

    model = open_peft_adapter(base.model, adapter_dir).eval()
    return ModelTarget(label, "adapter", model, base.tokenizer, cost)


def compare(
    rows: list[dict[str, Any]],
    forget_ids: list[str],
    holdout: list[dict[str, Any]],
    out: Path,
    s: CompareSettings,
    progress: Callable[[str], None] = _log,
    general: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the comparison and write the report to `out`; `general` defaults to the builtin
    general-knowledge questions."""
    from sift.builtin.general import general_eval_rows
    from sift.evaluation.targets import WorkspaceTarget
    from sift.exact.forget import forget
    from sift.merge.served import served_hashes
    from sift.models import LazyBase
    from sift.serving.answer import WorkspaceServer
    from sift.unlearn.run import UnlearnSettings, unlearn

    s.check()
    if out.exists() and any(out.iterdir()):
        raise SiftError(f"{out} is not empty; give a new folder for the report")
    check_unseen(holdout, rows)
    from sift.evaluation.worstcase import random_forget_set

    if s.forget_set == "ids":
        if not forget_ids:
            raise SiftError("give --forget-ids (or --forget-set random|worst-case --size K)")
    elif forget_ids:
        raise SiftError(f"--forget-set {s.forget_set} chooses the forget rows itself; leave out --forget-ids")
    else:
        forget_ids = random_forget_set(rows, s.size or 0)  # a stand-in for the checks below; replaced by the search
    forget_rows, retain_rows = split_rows(rows, forget_ids, s.eval.retain_sample)
    general = sample_general(general_eval_rows() if general is None else general, s.eval.general_sample)
    check_rows(forget_rows, retain_rows, general, holdout)  # before any training
    work = out / "work"
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    relearned: dict[str, dict[str, Any]] = {}
    selection: dict[str, Any] | None = (
        {"kind": s.forget_set, "size": len(forget_ids)} if s.forget_set != "ids" else None
    )

    def attack(model: Any, tok: Any, name: str, server: Any = None) -> None:
        """The relearning attack on one model (s.relearn), kept for the entry named `name`; with
        `server`, on the routed workspace (each held-out question's serving model attacked)."""
        if not s.relearn:
            return
        from sift.evaluation.relearn import relearn_attack, relearn_attack_routed

        t = time.perf_counter()
        relearned[name] = (
            relearn_attack_routed(server, forget_rows, s.relearn_settings)
            if server is not None
            else relearn_attack(model, tok, forget_rows, s.relearn_settings)
        )
        progress(
            f"relearning attack on {name}: contains {relearned[name]['before']['contains']:.2f} -> "
            f"{relearned[name]['after']['contains']:.2f} in {time.perf_counter() - t:.0f}s"
        )

    def run_eval(target: Any) -> dict[str, Any]:
        t = time.perf_counter()
        res = evaluate(target, forget_rows, retain_rows, general, holdout, None, s.eval, require_reference=False)
        progress(f"evaluated {target.label} in {time.perf_counter() - t:.0f}s")
        return res

    def add(
        res: dict[str, Any], name: str, kind: str, reference: dict[str, Any] | None, **extra: Any
    ) -> dict[str, Any]:
        if reference is not None:
            against_reference(res, reference)
        res.update(name=name, model=name, role=kind, **extra)
        entries.append(res)
        return res

    progress(f"training the sharded workspace ({s.num_shards} shards by {s.group_by or 'id'})")
    sharded, sharded_cost = build_trained(work / "sharded", rows, recipe_config(s, s.num_shards), merge=True)
    base = LazyBase(s.model, None, None, recipe_config(s, s.num_shards).compute)  # where its workspaces train
    base_model = base.get()
    server = WorkspaceServer(sharded, base=base)
    sharded_before = (
        run_eval(WorkspaceTarget("sharded, before forget (routed)", server, cost=sharded_cost))
        if s.sharded_original
        else None
    )

    progress("training the monolithic model (all rows, one adapter)")
    mono, mono_cost = build_trained(work / "monolithic", rows, recipe_config(s, 1), merge=False)
    if s.forget_set == "worst-case":
        from sift.adapters import open_peft_adapter
        from sift.evaluation.worstcase import WorstCaseSettings, worst_case_forget_set

        wc = WorstCaseSettings(size=s.size or 0, **(s.worst_case or {}))
        progress(
            f"searching the worst-case forget set of {wc.size} rows ({wc.iterations} upper steps x {wc.unlearn_steps} signSGD steps)"
        )
        t = time.perf_counter()
        found = worst_case_forget_set(
            open_peft_adapter(base_model.model, mono.adapter_dir(0), is_trainable=True), base_model.tokenizer, rows, wc
        )
        forget_ids = found["ids"]
        selection.update(
            ids=forget_ids,
            objective_history=found["objective_history"],  # type: ignore[union-attr]
            chosen_mean_loss=found["chosen_mean_loss"],
            seconds=round(time.perf_counter() - t, 1),
            settings=found["settings"],
        )
        forget_rows, retain_rows = split_rows(rows, forget_ids, s.eval.retain_sample)
        check_rows(forget_rows, retain_rows, general, holdout)
    elif selection is not None:
        selection["ids"] = forget_ids
    forget_set = {r["id"] for r in forget_rows}
    remaining = [r for r in rows if r["id"] not in forget_set]
    mono_target = _adapter_target("monolithic, before unlearning", base_model, mono.adapter_dir(0), mono_cost)
    mono_before = run_eval(mono_target)
    attack(mono_target.model, base_model.tokenizer, "original: monolithic (before unlearning)")

    progress("training the references without the forget rows: monolithic retrain, sharded rebuild")
    mono_ref_ws, mono_ref_cost = build_trained(
        work / "reference-monolithic", remaining, recipe_config(s, 1), merge=False
    )
    mono_ref_target = _adapter_target(
        "reference: monolithic retrain", base_model, mono_ref_ws.adapter_dir(0), mono_ref_cost
    )
    mono_ref = run_eval(mono_ref_target)
    attack(mono_ref_target.model, base_model.tokenizer, "reference: monolithic retrain")
    shard_ref_ws, shard_ref_cost = build_trained(
        work / "reference-sharded", remaining, recipe_config(s, s.num_shards), merge=True
    )
    ref_server = WorkspaceServer(shard_ref_ws, base=base)
    shard_ref = run_eval(WorkspaceTarget("reference: sharded rebuild (routed)", ref_server, cost=shard_ref_cost))
    shard_ref_merged = run_eval(
        WorkspaceTarget("reference: sharded rebuild (merged)", ref_server, merged=True, cost=shard_ref_cost)
    )
    if s.relearn:  # the routed workspace (what serves), and its merged model on its own
        attack(None, None, "reference: sharded rebuild, routed", server=ref_server)
        attack(*ref_server.merged_model()[:2], "reference: sharded rebuild, merged")

    add(mono_before, "original: monolithic (before unlearning)", "original", mono_ref)
    if sharded_before is not None:
        add(sharded_before, "original: sharded, routed (before forget)", "original", shard_ref)
    add(mono_ref, "reference: monolithic retrain", "reference", mono_ref)
    add(shard_ref, "reference: sharded rebuild, routed", "reference", shard_ref)
    add(shard_ref_merged, "reference: sharded rebuild, merged", "reference", shard_ref_merged)

    progress(f"exact: sift forget of {len(forget_set)} row(s)")
    cert = forget(sharded, sorted(forget_set), base=base, quiet=True)
    retrained = set(cert.get("shards_retrained", []))
    flops = sum(
        json.loads((sharded.adapter_dir(k) / "sift-meta.json").read_text()).get("flops_estimate", 0.0)
        for k in retrained
    )
    exact_cost = {"seconds": float(cert["seconds"]), "flops": float(flops)}
    identical = served_hashes(sharded.merged_dir)[0] == served_hashes(shard_ref_ws.merged_dir)[0]
    exact_server = WorkspaceServer(sharded, base=base)
    exact_routed = run_eval(WorkspaceTarget("exact: sift forget (routed)", exact_server, cost=exact_cost))
    attack(None, None, "exact: sift forget, routed", server=exact_server)
    add(exact_routed, "exact: sift forget, routed", "exact", shard_ref, identical_to_reference=identical)
    exact_merged = run_eval(WorkspaceTarget("exact: sift forget (merged)", exact_server, merged=True, cost=exact_cost))
    if s.relearn:
        attack(*exact_server.merged_model()[:2], "exact: sift forget, merged")
    add(exact_merged, "exact: sift forget, merged", "exact", shard_ref_merged, identical_to_reference=identical)
    del server, ref_server, exact_server  # each holds model copies; the baselines need the memory
    gc.collect()

    runs = [(m, UnlearnSettings(method=m, epochs=s.unlearn_epochs, lr=s.unlearn_lr)) for m in s.methods]
    runs += [(v, variant_settings(v, s.unlearn_epochs, s.unlearn_lr)) for v in s.variants]
    for i, (method, settings) in enumerate(runs):
        progress(f"approximate: {method}, {s.unlearn_epochs} epoch(s), evaluated after each")
        path: list[dict[str, Any]] = []

        def hook(
            epoch: int, model: Any, tok: Any, cost: dict[str, float], method: str = method, path: list = path
        ) -> None:
            from sift.evaluation.targets import ModelTarget

            res = run_eval(ModelTarget(f"{method} epoch {epoch}", "adapter", model, tok, dict(cost)))
            res["approximate"] = True
            name = f"{method} (epoch {epoch})"
            path.append(add(res, name, "approximate", mono_ref, method=method, epoch=epoch))
            if epoch == s.unlearn_epochs:
                attack(model, tok, name)

        unlearn(
            mono,
            sorted(forget_set),
            work / "unlearned" / f"{i:02d}-{method.replace(':', '-').replace(',', '-').replace('=', '')}",
            settings,
            base=base,
            quiet=True,
            on_epoch=hook,
        )

    challenge = None
    if s.seeds:
        from sift.evaluation.seeds import challenge_scores

        challenge = challenge_scores(
            rows, remaining, forget_rows, retain_rows, general, mono, s, work / "seeds", base, progress
        )

    for e in entries:  # the attack's outcome beside each attacked model's other metrics
        r = relearned.get(e["name"])
        if r is not None:
            e["metrics"].update(M.compute_metrics("relearn", M.MetricInputs(values=dict(e["metrics"]), relearn=r)))
            e["relearn"] = r
    result = {
        "settings": {**asdict(s), "eval": asdict(s.eval)},
        "forget_set": selection,
        "data": {
            "rows": len(rows),
            "forget": len(forget_rows),
            "retain_scored": len(retain_rows),
            "holdout": len(holdout),
            "general": len(general),
        },
        "exact_identical_to_sharded_rebuild": identical,
        "forget_certificate": {
            k: cert.get(k) for k in ("rows_removed", "shards_retrained", "shards_dropped", "shards_emptied", "seconds")
        },
        "entries": [{k: v for k, v in e.items() if k != "per_row"} for e in entries],
        "challenge": challenge,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_report(result, out)
    return result


def write_report(result: dict[str, Any], out: Path) -> None:
    from sift.fsio import atomic_write_json, atomic_write_text

    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "table.md", report_markdown(result))
    from sift.evaluation.plots import cost_plot, tradeoff_plot

    tradeoff_plot(result, out / "tradeoff.png")
    cost_plot(result, out / "cost.png")


def report_markdown(result: dict[str, Any]) -> str:

    entries = result["entries"]
    lines = [
        f"# sift compare: {result['data']['forget']} forget rows, {result['data']['rows']} rows in all",
        "",
        "forget_quality and privleak are against each row's reference: approximate methods and the monolithic original "
        "against the monolithic retrain; the exact path and the sharded original against the sharded rebuild. "
        f"Exact path's served bytes identical to the sharded rebuild's: **{'yes' if result['exact_identical_to_sharded_rebuild'] else 'NO'}**.",
        "",
        M.ks_resolution(result["data"]["forget"]) + ".",
        "",
        metric_table(entries, TABLE_METRICS),
        "",
        "Metrics (direction; formula):",
        "",
    ]
    lines += [f"- `{m.name}`: {m.better} is better; {m.formula}" for m in M.METRICS.values()]
    ch = result.get("challenge")
    if ch:
        lines += [
            "",
            "## Unlearning-challenge forgetting score (NeurIPS 2023)",
            "",
            ch["note"],
            "",
            "| method | F | 95 % interval | final score | ceiling F (reference vs reference) |",
            "|---|---|---|---|---|",
        ]
        for row in ch["rows"]:
            lo, hi = row["interval"]
            lines.append(
                f"| {row['method']} | {row['F']:.3f} | {lo:.3f}-{hi:.3f} | {row['final']:.3f} | {row['ceiling']:.3f} |"
            )
    lines.append("")
    return "\n".join(lines)
