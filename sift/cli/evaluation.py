"""Approximate baselines and evaluation: unlearn, eval, compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sift.cli.app import AsJson, Wait, Ws, _command, _emit, app
from sift.config import FALLBACKS, ROUTERS
from sift.errors import SiftError
from sift.unlearn.methods import UNLEARN_METHODS


@app.command()
@_command
def unlearn(
    workspace: Ws,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help=" | ".join(UNLEARN_METHODS) + " (the registered methods; docs/unlearning.md gives each loss).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for the unlearned adapter (peft format + sift-unlearn.json), outside the workspace."
        ),
    ],
    ids: Annotated[
        Optional[str],
        typer.Option("--ids", help="Comma-separated ids of the rows to unlearn, or '-' for one per line on stdin."),
    ] = None,
    ids_file: Annotated[Optional[str], typer.Option(help="File with one id per line.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the forget rows.")] = 5,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (ngdiff: GeN's starting step size).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(help="Forget rows (and retain rows) per step.")] = 8,
    beta: Annotated[
        Optional[float], typer.Option(help="npo: inverse temperature (default 0.1); simnpo: (default 4.5).")
    ] = None,
    gamma: Annotated[Optional[float], typer.Option(help="simnpo: reward margin (default 0).")] = None,
    forget_weight: Annotated[
        Optional[float],
        typer.Option(
            help="graddiff: weight of the forget ascent (default 1); simnpo: forget coefficient (default 0.125)."
        ),
    ] = None,
    retain_weight: Annotated[
        Optional[float],
        typer.Option(
            help="graddiff, simnpo: weight of the retain NLL (default 1); npo: 0 (plain NPO), > 0 adds the retain term."
        ),
    ] = None,
    gen_every: Annotated[int, typer.Option(help="ngdiff: refit GeN's learning rate every this many steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the forget order and the retain batches.")] = 0,
    mask: Annotated[
        Optional[str],
        typer.Option(
            help="Move only the top --mask-ratio of the weights by this score: wagle (weight attribution, Jia et al. NeurIPS 2024), magnitude or random (its controls)."
        ),
    ] = None,
    mask_ratio: Annotated[
        Optional[float], typer.Option(help="Fraction of the weights that --mask lets move (default 0.8).")
    ] = None,
    sam: Annotated[
        Optional[float],
        typer.Option(
            "--sam",
            help="Sharpness-aware unlearning: smooth the forget loss over an L2 ball of radius RHO (e.g. 0.01; Fan et al. 2025).",
        ),
    ] = None,
    l1: Annotated[
        Optional[float],
        typer.Option(
            help="Add gamma_e * ||theta||_1, gamma decaying linearly over the epochs (l1sparse: default 1e-4)."
        ),
    ] = None,
    prune: Annotated[
        Optional[float],
        typer.Option(
            help="Prune first: zero this fraction of the adapter's weights by magnitude and keep them zero (Jia et al. NeurIPS 2023)."
        ),
    ] = None,
    coreset: Annotated[
        Optional[float],
        typer.Option(
            help="Unlearn with a random FRACTION of the forget rows only (the coreset effect); evaluate on all of them."
        ),
    ] = None,
    as_json: AsJson = False,
    wait: Wait = 0.0,
) -> None:
    """APPROXIMATE unlearning baseline: tune the model trained on all rows away from the forget rows.

    Not an exact forget: the workspace keeps the rows, its served model and ledger are untouched.
    Compare it with `sift forget` (exact)."""
    from sift.data import parse_ids
    from sift.unlearn.run import UnlearnSettings
    from sift.unlearn.run import unlearn as do_unlearn
    from sift.workspace import Workspace

    ws = Workspace(workspace)
    ws.require()
    settings = UnlearnSettings(
        method=method,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        beta=beta,
        gamma=gamma,
        forget_weight=forget_weight,
        retain_weight=retain_weight,
        gen_every=gen_every,
        seed=seed,
        mask=mask,
        mask_ratio=mask_ratio,
        sam_rho=sam,
        l1=l1,
        prune=prune,
        coreset=coreset,
    )
    settings.resolved()  # refuse bad values before reading ids or loading anything
    id_list = parse_ids(ids, ids_file)
    with ws.lock(wait=wait, command="unlearn"):  # it may train and cache the monolithic adapter
        record = do_unlearn(ws, id_list, out, settings)
    _emit(
        record,
        as_json,
        lambda r: (
            f"APPROXIMATE unlearning ({r['method']}, {r['steps']} steps, {r['seconds']:.1f}s) of "
            f"{r['forget_rows']} row(s) written to {r['out']}; not an exact forget: use `sift forget` for that"
        ),
    )


def _eval_help() -> str:
    from sift.evaluation.metrics import metrics_help

    return (
        "Evaluate one model against a retain reference, with open-unlearning's metric names and definitions.\n\n"
        "MODEL: a workspace (its routed serving; --merged for its merged model), a served folder, a peft adapter "
        "folder (e.g. a `sift unlearn` output) or a model name (the untrained base).\n\n"
        "Metrics (direction; formula):\n\n" + metrics_help().replace("\n", "\n\n")
    )


@app.command("eval", help=_eval_help())
@_command
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Workspace, served folder, peft adapter folder or model name.")],
    data: Annotated[
        Optional[Path], typer.Option("--data", help="The rows (JSONL) the model was trained on (not with --benchmark).")
    ] = None,
    benchmark: Annotated[
        Optional[str],
        typer.Option(
            help="Evaluate on a published benchmark's own sets instead of --data: tofu (open-unlearning's TOFU table; "
            "--forget-split), muse-news or muse-books (MUSE's VerbMem, KnowMem, PrivLeak). Read from the hub, or "
            "--benchmark-source."
        ),
    ] = None,
    forget_split: Annotated[
        Optional[str], typer.Option(help="TOFU: forget01, forget05 or forget10 (default forget10).")
    ] = None,
    benchmark_source: Annotated[
        Optional[str],
        typer.Option(help="The benchmark's hub repo or a local folder with its tables (docs/benchmarks-published.md)."),
    ] = None,
    template: Annotated[
        str,
        typer.Option(
            help="How questions are posed: chat (the tokenizer's chat template, as sift trains), tofu "
            "('Question: {q}\\nAnswer: ', what TOFU's base models and open-unlearning's Llama-2 numbers use) or raw. Recorded in the result."
        ),
    ] = "chat",
    answer_span: Annotated[
        str,
        typer.Option(
            help="Which tokens count as the answer: sift (the answer and EOS) or open-unlearning (its preprocessing: "
            "everything the template puts after the prompt, end-of-turn tokens included). Recorded in the result."
        ),
    ] = "sift",
    system_prompt: Annotated[
        Optional[str],
        typer.Option(
            help="A system turn before each question (chat template only; open-unlearning's Llama-3 configs use 'You are a helpful assistant.')."
        ),
    ] = None,
    date_string: Annotated[
        Optional[str],
        typer.Option(
            help="Passed to the chat template (Llama-3 prints it; open-unlearning's configs use '10 Apr 2025')."
        ),
    ] = None,
    forget_ids: Annotated[
        Optional[str],
        typer.Option("--forget-ids", help="Comma-separated forget ids, or '-' for one per line on stdin."),
    ] = None,
    forget_ids_file: Annotated[Optional[str], typer.Option(help="File with one forget id per line.")] = None,
    holdout: Annotated[
        Optional[Path],
        typer.Option(
            help="Rows of people never trained on (JSONL), for membership inference: `sift builtin-data --split holdout`."
        ),
    ] = None,
    reference: Annotated[
        Optional[str],
        typer.Option(
            help="The retain reference: a model trained without the forget rows (any MODEL form), or the JSON a `sift eval --out` of it saved."
        ),
    ] = None,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Leave out forget_quality and privleak (they need the reference).")
    ] = False,
    merged: Annotated[
        bool, typer.Option("--merged", help="A workspace: evaluate its merged model instead of its routed serving.")
    ] = False,
    router: Annotated[
        Optional[str], typer.Option(help=f"A workspace: the router ({' | '.join(ROUTERS)}; default: the workspace's).")
    ] = None,
    fallback: Annotated[
        Optional[str], typer.Option(help=f"A workspace: who answers what no shard claims ({' | '.join(FALLBACKS)}).")
    ] = None,
    base_model: Annotated[
        Optional[str], typer.Option("--model", help="Base model of a peft adapter that does not name one.")
    ] = None,
    general: Annotated[
        bool,
        typer.Option(
            "--general/--no-general",
            help="Score the builtin general-knowledge questions (the wf_* metrics of model_utility).",
        ),
    ] = True,
    retain_sample: Annotated[
        Optional[int], typer.Option(help="Score only this many retain rows (a fixed choice by id hash).")
    ] = None,
    general_sample: Annotated[
        Optional[int], typer.Option(help="Score only this many general questions (a fixed choice by id hash).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy answer length limit for ROUGE and recall.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Also save the full result (per-row values included) to this JSON file; usable as a later --reference.",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    from sift.data import parse_ids
    from sift.evaluation.run import EvalSettings, evaluate_model, metric_table
    from sift.fsio import atomic_write_json

    settings = EvalSettings(
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        retain_sample=retain_sample,
        general_sample=general_sample,
        template=template,
        answer_span=answer_span,
        system_prompt=system_prompt,
        date_string=date_string,
    )
    if benchmark is not None:
        result = _eval_benchmark(
            model,
            benchmark,
            forget_split,
            benchmark_source,
            settings,
            reference,
            no_reference,
            {"merged": merged, "router": router, "fallback": fallback, "base_name": base_model},
            given=[
                n
                for n, v in (
                    ("--data", data),
                    ("--forget-ids", forget_ids),
                    ("--forget-ids-file", forget_ids_file),
                    ("--holdout", holdout),
                )
                if v is not None
            ],
        )
        if out is not None:
            atomic_write_json(out, result)
        _emit({k: v for k, v in result.items() if k != "per_row"}, as_json, _benchmark_human)
        return
    if data is None:
        raise SiftError("give --data (the rows the model was trained on) or --benchmark tofu|muse-news|muse-books")
    if forget_split is not None or benchmark_source is not None:
        raise SiftError("--forget-split and --benchmark-source go with --benchmark")
    result = evaluate_model(
        model,
        data,
        parse_ids(forget_ids, forget_ids_file),
        holdout,
        reference=reference,
        no_reference=no_reference,
        settings=settings,
        general=general,
        merged=merged,
        router=router,
        fallback=fallback,
        base_model=base_model,
    )
    if out is not None:
        atomic_write_json(out, result)
    summary = {k: v for k, v in result.items() if k != "per_row"}
    from sift.evaluation.metrics import EVAL_TABLE as names

    def human(r: dict[str, Any]) -> str:
        rows_ = _with_reference_row(r)
        shown = [n for n in names if any(n in x["metrics"] for x in rows_)]
        fq = r.get("forget_quality")
        tail = (
            f"\nforget_quality: p = {fq['p']:.3g} (log10 {fq['log10_p']:.2f}), n = {fq['n']}"
            if fq
            else "\n(no reference: forget_quality and privleak left out)"
        )
        return metric_table(rows_, shown) + tail + ("\nAPPROXIMATE unlearning output" if r.get("approximate") else "")

    _emit(summary, as_json, human)


def _eval_benchmark(
    model: str,
    benchmark: str,
    forget_split: str | None,
    source: str | None,
    settings: Any,
    reference: str | None,
    no_reference: bool,
    target_options: dict[str, Any],
    given: list[str],
) -> dict[str, Any]:
    from sift.evaluation.benchmark import BENCHMARK_NAMES, evaluate_muse_model, evaluate_tofu

    if benchmark not in BENCHMARK_NAMES:
        raise SiftError(f"unknown benchmark {benchmark!r}: use one of {', '.join(BENCHMARK_NAMES)}")
    if given:
        raise SiftError(f"--benchmark reads its own sets: leave out {', '.join(given)}")
    if benchmark == "tofu":
        return evaluate_tofu(
            model, forget_split or "forget10", source, reference, no_reference, settings, target_options
        )
    from sift.evaluation.muse import MuseSettings
    from sift.evaluation.run import check_reference_choice

    if forget_split is not None:
        raise SiftError("--forget-split is TOFU's; MUSE has one forget set")
    if settings.prompt_format() != settings.__class__().prompt_format():
        raise SiftError(
            "MUSE poses its questions one way (open-unlearning's 'Question: ... Answer:' with in-context examples): leave out --template, --answer-span, --system-prompt and --date-string"
        )
    if reference is not None:  # MUSE's reference is optional (AUC_ref 0.5 without one), but not beside --no-reference
        check_reference_choice(reference, no_reference)
    muse_settings = MuseSettings(batch_size=settings.batch_size)
    return evaluate_muse_model(model, benchmark, source, reference, muse_settings, target_options)


def _with_reference_row(r: dict[str, Any]) -> list[dict[str, Any]]:
    """A result, and its reference's metrics as a second table row when it was scored here."""
    return [r] + (
        [{"model": f"reference: {r['reference']}", "metrics": r["reference_metrics"]}]
        if r.get("reference_metrics")
        else []
    )


def _benchmark_human(r: dict[str, Any]) -> str:
    from sift.evaluation.metrics import EVAL_TABLE, MUSE_TABLE
    from sift.evaluation.run import metric_table

    b = r["benchmark"]
    names = EVAL_TABLE if b["name"] == "tofu" else MUSE_TABLE
    rows_ = _with_reference_row(r)
    shown = [n for n in names if any(n in x["metrics"] for x in rows_)]
    head = f"{b['name']}" + (f" {b['forget_split']}" if b.get("forget_split") else "") + f" from {b['source']}"
    fmt = r["settings"]
    if b["name"] == "tofu":
        head += f"; template {fmt['template']}, answer span {fmt['answer_span']}"
    else:
        head += f"; privleak against AUC_ref {r['reference_auc']:.4f} ({r['reference']})"
    return head + "\n" + metric_table(rows_, shown)


@app.command("compare")
@_command
def compare_cmd(
    data: Annotated[Path, typer.Option("--data", help="The rows (JSONL).")],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="New folder for the report (table.md, results.json, tradeoff.png, cost.png) and its work/."
        ),
    ],
    forget_ids: Annotated[
        Optional[str],
        typer.Option("--forget-ids", help="Comma-separated forget ids, or '-' for one per line on stdin."),
    ] = None,
    forget_ids_file: Annotated[Optional[str], typer.Option(help="File with one forget id per line.")] = None,
    holdout: Annotated[
        Optional[Path], typer.Option(help="Rows of people never trained on (JSONL), for membership inference.")
    ] = None,
    model: Annotated[
        str, typer.Option("--model", help="Base model: 'builtin' or a Hugging Face name / local folder.")
    ] = "builtin",
    num_shards: Annotated[int, typer.Option(help="Shards of the exact path.")] = 8,
    group_by: Annotated[
        Optional[str],
        typer.Option(help="Column that keeps rows together in one shard (e.g. owner); 'none' to shard by id."),
    ] = "owner",
    epochs: Annotated[
        Optional[int], typer.Option(help="Training epochs of every model (default: sift's recipe, 10).")
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Approximate baselines, comma-separated.")
    ] = "ga,graddiff,npo,simnpo,ngdiff",
    unlearn_epochs: Annotated[
        int, typer.Option(help="Unlearning epochs of each baseline (each is evaluated after every epoch).")
    ] = 3,
    unlearn_lr: Annotated[float, typer.Option(help="Baselines' learning rate (ngdiff: GeN's start).")] = 1e-4,
    seeds: Annotated[
        int,
        typer.Option(
            help="Also compute the NeurIPS 2023 challenge's forgetting score with N seeded models per side (0: off; costly: about 4N monolithic and 3N sharded trainings)."
        ),
    ] = 0,
    seeds_cache: Annotated[
        Optional[Path],
        typer.Option(
            help="With --seeds: keep each seeded model's numbers in this folder as soon as they are known; a later run with the same data and settings reads them instead of training again (a cut run resumes; a larger N reuses the first models)."
        ),
    ] = None,
    retain_sample: Annotated[
        Optional[int], typer.Option(help="Retain rows scored for utility (a fixed choice by id hash).")
    ] = 15,
    general_sample: Annotated[
        Optional[int], typer.Option(help="General-knowledge questions scored (a fixed choice by id hash; 0: none).")
    ] = 15,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            help="Greedy answer length limit for ROUGE and recall (open-unlearning: 200; the builtin answers are one sentence of under 30 tokens, so 48 keeps the run short)."
        ),
    ] = 48,
    sharded_original: Annotated[
        bool,
        typer.Option(
            "--sharded-original",
            help="Also evaluate the sharded workspace before the forget (the monolithic original is always evaluated).",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass in evaluation.")] = 16,
    variant: Annotated[
        Optional[list[str]],
        typer.Option(
            "--variant",
            help="Another approximate run, 'method:key=value,...' (keys sam, mask, mask_ratio, l1, prune, coreset, beta, gamma, forget_weight, retain_weight), e.g. 'npo:sam=0.01', 'graddiff:mask=wagle,mask_ratio=0.8', 'l1sparse'. Repeat for more.",
        ),
    ] = None,
    relearn: Annotated[
        bool,
        typer.Option(
            "--relearn",
            help="Relearning attack on the originals, references, exact path (routed: each question's serving model; and merged) and each approximate run's last epoch: a fresh LoRA fine-tuned on half the forget rows, recall measured on the other half.",
        ),
    ] = False,
    relearn_epochs: Annotated[
        int, typer.Option(help="Relearning attack: passes over its half of the forget rows.")
    ] = 5,
    relearn_lr: Annotated[
        float, typer.Option(help="Relearning attack: AdamW learning rate (1e-3: the LoRA fine-tuning's own).")
    ] = 1e-3,
    forget_set: Annotated[
        str,
        typer.Option(
            help="ids (--forget-ids), random or worst-case: choose --size rows (worst-case: the bi-level search of Fan et al., ECCV 2024, on the monolithic model)."
        ),
    ] = "ids",
    size: Annotated[Optional[int], typer.Option(help="Rows to forget with --forget-set random|worst-case.")] = None,
    as_json: AsJson = False,
) -> None:
    """Exact forgetting beside every approximate baseline, against retrained references; writes a report.

    Runs on one data set and forget set: the sharded workspace and `sift forget` (exact, served routed
    and merged), each `sift unlearn` baseline from the monolithic model (evaluated after every epoch),
    and the references retrained without the forget rows (monolithic and sharded). See `sift eval --help`
    for every metric."""
    from sift.data import parse_ids
    from sift.evaluation.compare import CompareSettings, compare, report_markdown
    from sift.evaluation.relearn import RelearnSettings
    from sift.evaluation.run import EvalSettings, read_holdout, read_rows

    settings = CompareSettings(
        model=model,
        num_shards=num_shards,
        group_by=None if group_by in (None, "none") else group_by,
        epochs=epochs,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        unlearn_epochs=unlearn_epochs,
        unlearn_lr=unlearn_lr,
        seeds=seeds,
        seeds_cache=None if seeds_cache is None else str(seeds_cache),
        sharded_original=sharded_original,
        eval=EvalSettings(
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            retain_sample=retain_sample,
            general_sample=general_sample,
        ),
        variants=tuple(variant or ()),
        relearn=relearn,
        relearn_settings=RelearnSettings(epochs=relearn_epochs, lr=relearn_lr),
        forget_set=forget_set,
        size=size,
    )
    settings.check()
    rows = read_rows(data)
    held = read_holdout(holdout, rows)
    given = parse_ids(forget_ids, forget_ids_file) if (forget_ids is not None or forget_ids_file is not None) else []
    result = compare(rows, given, held, out, settings)
    _emit(
        result,
        as_json,
        lambda r: (
            report_markdown(r)
            + f"\nreport written to {out}/ (table.md, results.json, tradeoff.png, cost.png) in {r['seconds']:.0f}s"
        ),
    )
