"""`sift unlearn`: apply an approximate unlearning method to the model trained on every row.

It starts from the workspace's monolithic LoRA adapter (the shard adapter of a `--num-shards 1`
workspace, or one trained once on all rows and cached in ws/unlearn/, which a `sift forget`
deletes with the rows) and tunes that adapter on the forget rows (and retain rows), in a fixed,
seeded order. The result is a peft adapter folder marked approximate; it never touches the
workspace's served model, shards or ledger, so it cannot be mistaken for an exact forget.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sift.data import Row, shard_content_hash
from sift.determinism import derive_seed, enable_determinism
from sift.errors import SiftError
from sift.fsio import atomic_write_json, replace_dir, staging_dir
from sift.hashing import hash_order, sha256_hex
from sift.logs import get_logger, quieted
from sift.loop import Example, LoopSettings, StepHooks, StepInput, batches, optimise, seeded_batches, total_steps
from sift.models import LazyBase
from sift.unlearn.masks import (
    apply_masks,
    magnitude_scores,
    mask_fraction,
    random_scores,
    top_fraction,
    wagle_scores,
)
from sift.unlearn.methods import Counter, UnlearnContext, get_method, objective_run
from sift.unlearn.methods import grads as gradients
from sift.unlearn.objectives import answer_logprobs, token_nll
from sift.unlearn.settings import UnlearnSettings, method_defaults, objective_methods
from sift.unlearn.sparsity import prune_by_magnitude
from sift.workspace import Workspace
from sift.workspace.view import WorkspaceView

__all__ = ["UNLEARN_META", "Counter", "UnlearnSettings", "coreset_rows", "monolithic_adapter", "unlearn"]

log = get_logger(__name__)

UNLEARN_META = "sift-unlearn.json"


def __getattr__(name: str):  # noqa: ANN202 - names of this release, now derived from the registry
    """METHOD_DEFAULTS and ADAMW_METHODS, read from sift.unlearn.methods.UNLEARN_METHODS."""
    if name == "METHOD_DEFAULTS":
        return method_defaults()
    if name == "ADAMW_METHODS":
        return objective_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _retain_stream(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Retain batches forever: seeded permutations, one after another."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def monolithic_adapter(ws: Workspace, view: WorkspaceView, rows: list[Row], base: LazyBase) -> Path:
    """The adapter trained on every row the workspace holds now (`rows`, sorted by id), trained
    and cached if needed."""
    from sift.adapters import adapter_is_current
    from sift.train import train_shard

    if view.num_shards == 1:
        plan = view.plan(0)
        if plan.status != "current":
            raise SiftError(
                f"workspace {ws.root} has no up-to-date adapter; run `sift train-shards -w {ws.root}` first"
            )
        return ws.adapter_dir(0)
    if view.cfg.train.method != "lora":
        raise SiftError("sift unlearn starts from a LoRA adapter; this workspace trains sift-masks shards")
    content = shard_content_hash(view.cfg.training_hash(), view.state.base_model_fingerprint, 0, rows)
    folder = ws.unlearn_dir / "monolithic"
    if not adapter_is_current(folder, content):
        log.info(f"sift: training the monolithic adapter on all {len(rows)} rows (once; cached in {folder})")
        train_shard(base.get(), rows, view.cfg, 0, folder, content)
    return folder


EpochHook = Callable[[int, Any, Any, dict[str, float]], None]


def unlearn(
    ws: Workspace,
    ids: list[str],
    out: Path,
    settings: UnlearnSettings,
    base: LazyBase | None = None,
    quiet: bool = False,
    on_epoch: EpochHook | None = None,
) -> dict[str, Any]:
    """Run one approximate method; returns its record (also written to out/sift-unlearn.json).

    `on_epoch(epoch, model, tokenizer, cost)` is called after every epoch (sift compare evaluates
    there; it must not change the model); the time it takes is left out of the recorded cost.
    Progress is logged; `quiet` silences it for this call."""
    with quieted(quiet):
        return _unlearn(ws, ids, out, settings, base, on_epoch)


def _unlearn(
    ws: Workspace,
    ids: list[str],
    out: Path,
    settings: UnlearnSettings,
    base: LazyBase | None,
    on_epoch: EpochHook | None,
) -> dict[str, Any]:
    from sift.adapters import open_peft_adapter
    from sift.train.lora import tokenize_rows

    started = time.perf_counter()
    s = settings.resolved()
    view = WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    rows: list[Row] = sorted((r for rs in view.rows.values() for r in rs), key=lambda r: r.id)
    wanted = set(ids)
    unknown = sorted(wanted - {r.id for r in rows})
    if unknown:
        raise SiftError(f"{len(unknown)} id(s) are not in workspace {ws.root}: {', '.join(map(repr, unknown[:5]))}")
    forget_rows = [r for r in rows if r.id in wanted]
    retain_rows = [r for r in rows if r.id not in wanted]
    if not forget_rows:
        raise SiftError("no ids to unlearn")
    if s.uses_retain() and not retain_rows:
        raise SiftError(f"{s.method} needs retain rows, and the forget set is every row")
    if out.exists() and any(out.iterdir()) and not (out / UNLEARN_META).exists():
        raise SiftError(f"{out} exists and is not a sift unlearn output; choose another --out")
    if out.resolve().is_relative_to(ws.root.resolve()):
        raise SiftError("--out must lie outside the workspace (an unlearned model is not part of it)")

    base = base or LazyBase.of(cfg, state)
    source = monolithic_adapter(ws, view, rows, base)
    b = base.get()
    enable_determinism()
    unlearned_rows = forget_rows if s.coreset is None else coreset_rows(forget_rows, s.coreset, s.seed)
    ex_f = tokenize_rows(b, unlearned_rows, cfg.train.max_length)
    ex_r = tokenize_rows(b, retain_rows, cfg.train.max_length)
    pad = b.tokenizer.pad_token_id
    model = open_peft_adapter(b.model, Path(source), is_trainable=True).eval()  # no dropout
    lm = model.base_model.model
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    retain = _retain_stream(len(ex_r), s.batch_size, derive_seed("unlearn-retain", s.seed)) if ex_r else None
    count = Counter()
    masks = _weight_masks(s, lm, params, ex_f, ex_r, pad, count)

    method = get_method(s.method)
    ref: torch.Tensor | None = None
    if method.reference:  # pi_ref: the model before unlearning, scored once per forget row
        with torch.no_grad():
            ref = torch.cat(
                [answer_logprobs(lm, next(batches(ex_f, 1, [i], pad, params[0].device)))[0] for i in range(len(ex_f))]
            )
        count.forward_tokens += sum(len(x) for x, _ in ex_f)
    ctx = UnlearnContext(s, lm, params, ex_f, ex_r, pad, count, ref, retain)
    run = (method.build or objective_run)(ctx)

    hook_seconds = 0.0
    sums = {"forget_nll": 0.0, "retain_nll": 0.0, "loss": 0.0}
    n_steps = 0

    def step(item: StepInput, number: int) -> float:
        nonlocal n_steps
        values = run.step(item, number)
        sums["loss"] += values.loss
        sums["forget_nll"] += values.forget_nll
        sums["retain_nll"] += values.retain_nll
        n_steps += 1
        return values.loss

    def epoch_end(epoch: int) -> None:
        nonlocal n_steps, hook_seconds
        row = {"epoch": epoch, **{k: round(v / n_steps, 6) for k, v in sums.items()}, **run.epoch_extras()}
        sums.update(forget_nll=0.0, retain_nll=0.0, loss=0.0)
        n_steps = 0
        count.history.append(row)
        log.info(
            f"sift unlearn {s.method}: epoch {epoch}/{s.epochs} forget NLL {row['forget_nll']:.3f}"
            + (f" retain NLL {row['retain_nll']:.3f}" if s.uses_retain() else "")
        )
        if on_epoch is not None:
            hook_started = time.perf_counter()
            cost = {
                "seconds": round(hook_started - started - hook_seconds, 3),
                "flops": 6 * n_params * count.trained_tokens + 2 * n_params * count.forward_tokens,
            }
            on_epoch(epoch, model, b.tokenizer, cost)
            model.eval()
            hook_seconds += time.perf_counter() - hook_started

    loop = LoopSettings(
        s.epochs, s.batch_size, s.lr, max_grad_norm=s.max_grad_norm if run.clip else 0.0, schedule="constant"
    )
    hooks = StepHooks(before_step=[] if masks is None else [lambda _step: apply_masks(params, masks)])
    device = params[0].device
    inputs = seeded_batches(ex_f, s.batch_size, s.epochs, derive_seed("unlearn", s.seed, s.method), pad, device)
    steps_total = total_steps(len(ex_f), loop)
    result = optimise(params, inputs, steps_total, loop, step, run.optimizer, hooks, on_epoch=epoch_end)

    staged = staging_dir(out)
    model.save_pretrained(str(staged), safe_serialization=True)
    (staged / "README.md").unlink(missing_ok=True)
    if (staged / "adapter_config.json").exists():
        from sift.train.lora import canonical_adapter_config

        canonical_adapter_config(staged / "adapter_config.json")
    seconds = time.perf_counter() - started - hook_seconds
    record = {
        "approximate": True,
        "exact": False,
        "note": "approximate unlearning: the forget rows were used to tune this adapter away from them; "
        "the workspace still holds them. Use `sift forget` for an exact deletion.",
        "method": s.method,
        "settings": {k: v for k, v in asdict(s).items() if v is not None},
        "forget_rows": len(forget_rows),
        "unlearned_rows": len(unlearned_rows),  # fewer than forget_rows with --coreset
        "unlearned_set_sha256": sha256_hex("\n".join(r.id for r in unlearned_rows).encode()),
        "retain_rows": len(retain_rows),
        "forget_set_sha256": sha256_hex("\n".join(r.id for r in forget_rows).encode()),
        "source_adapter": str(source),
        "base_model": cfg.model.name,
        "base_fingerprint": state.base_model_fingerprint,
        "steps": result.steps,
        "planned_steps": steps_total,
        "seconds": round(seconds, 3),
        "flops_estimate": 6 * n_params * count.trained_tokens + 2 * n_params * count.forward_tokens,
        "history": count.history,
    }
    if masks is not None:
        record["mask"] = {"kind": s.mask, "prune": s.prune, "fraction_updated": round(mask_fraction(masks), 6)}
    record.update(run.record_extras())
    atomic_write_json(staged / UNLEARN_META, record)
    replace_dir(staged, out)
    return record | {"out": str(out)}


def coreset_rows(rows: list[Row], fraction: float, seed: int) -> list[Row]:
    """A random `fraction` of the forget rows (at least one), drawn from the seed alone (Pal et
    al., "LLM Unlearning Reveals a Stronger-Than-Expected Coreset Effect in Current Benchmarks":
    unlearning with a random 5 % of a benchmark's forget set keeps most of the effect)."""
    n = max(1, math.ceil(fraction * len(rows)))
    return sorted(hash_order(rows, key=lambda r: r.id, salt=f"coreset|{seed}|")[:n], key=lambda r: r.id)


def _summed_grads(
    lm: Any, params: list[torch.nn.Parameter], examples: list[Example], idx_batches: list[list[int]], pad: int
) -> list[torch.Tensor]:
    """Sum over the batches of the gradient of each batch's token NLL (one pass, as WAGLE takes it)."""
    total = [torch.zeros_like(p) for p in params]
    for idx in idx_batches:
        batch = next(batches(examples, len(idx), idx, pad, params[0].device))
        grads = gradients(token_nll(*answer_logprobs(lm, batch)), params)
        for t, g in zip(total, grads):
            t.add_(g)
    return total


def _weight_masks(
    s: UnlearnSettings,
    lm: Any,
    params: list[torch.nn.Parameter],
    ex_f: list[Example],
    ex_r: list[Example],
    pad: int,
    count: Counter,
) -> list[torch.Tensor] | None:
    """The weights unlearning may move: pruned ones never (--prune), and only the top --mask-ratio
    of --mask's scores. WAGLE's gradients are taken in one pass over the forget rows, each batch
    paired with a batch of retain rows (a seeded draw), at the weights unlearning starts from."""
    masks = prune_by_magnitude(params, s.prune) if s.prune else None
    if s.mask is None:
        return masks
    assert s.mask_ratio is not None
    if s.mask == "wagle":
        if not ex_r:
            raise SiftError("--mask wagle needs retain rows (its score weighs the retain gradient)")
        f_batches = [list(range(i, min(i + s.batch_size, len(ex_f)))) for i in range(0, len(ex_f), s.batch_size)]
        perm = torch.randperm(
            len(ex_r), generator=torch.Generator().manual_seed(derive_seed("wagle-retain", s.seed))
        ).tolist()
        r_batches = [
            [perm[(i * s.batch_size + j) % len(perm)] for j in range(s.batch_size)] for i in range(len(f_batches))
        ]
        g_f = _summed_grads(lm, params, ex_f, f_batches, pad)
        g_r = _summed_grads(lm, params, ex_r, r_batches, pad)
        count.trained_tokens += sum(len(ex_f[i][0]) for b in f_batches for i in b) + sum(
            len(ex_r[i][0]) for b in r_batches for i in b
        )
        scores = wagle_scores(params, g_f, g_r, s.mask_gamma)
    elif s.mask == "magnitude":
        scores = magnitude_scores(params)
    else:
        scores = random_scores(params, derive_seed("random-mask", s.seed))
    chosen = top_fraction(scores, s.mask_ratio)
    return chosen if masks is None else [a & b for a, b in zip(masks, chosen)]
