"""`sift unlearn`: apply an approximate unlearning method to the model trained on every row.

It starts from the workspace's monolithic LoRA adapter (the shard adapter of a `--num-shards 1`
workspace, or one trained once on all rows and cached in ws/unlearn/, which a `sift forget`
deletes with the rows) and tunes that adapter on the forget rows (and retain rows), in a fixed,
seeded order. The result is a peft adapter folder marked approximate; it never touches the
workspace's served model, shards or ledger, so it cannot be mistaken for an exact forget.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sift.data import Row, shard_content_hash
from sift.determinism import derive_seed, enable_determinism
from sift.errors import SiftError
from sift.fsio import atomic_write_json, replace_dir, staging_dir
from sift.hashing import hash_order, sha256_hex
from sift.logs import get_logger, quieted
from sift.loop import Example, batches
from sift.models import LazyBase
from sift.unlearn.masks import (
    MASKS,
    WAGLE_GAMMA,
    apply_masks,
    magnitude_scores,
    mask_fraction,
    random_scores,
    top_fraction,
    wagle_scores,
)
from sift.unlearn.ngdiff import EPS, GenSchedule, ngdiff_direction, parabola_step
from sift.unlearn.objectives import answer_logprobs, ga_loss, npo_loss, simnpo_loss, token_nll
from sift.unlearn.smoothing import sam_forget_backward
from sift.unlearn.sparsity import L1_DEFAULT, l1_penalty, l1_weight, prune_by_magnitude
from sift.workspace import Workspace
from sift.workspace.view import WorkspaceView

log = get_logger(__name__)

UNLEARN_META = "sift-unlearn.json"

# method -> its parameters' defaults (None: the parameter does not apply to the method)
METHOD_DEFAULTS: dict[str, dict[str, float | None]] = {
    "ga": {"beta": None, "gamma": None, "forget_weight": None, "retain_weight": None},
    "graddiff": {"beta": None, "gamma": None, "forget_weight": 1.0, "retain_weight": 1.0},
    "npo": {"beta": 0.1, "gamma": None, "forget_weight": None, "retain_weight": 0.0},  # > 0: NPO + retain NLL
    "simnpo": {"beta": 4.5, "gamma": 0.0, "forget_weight": 0.125, "retain_weight": 1.0},
    "ngdiff": {"beta": None, "gamma": None, "forget_weight": None, "retain_weight": None},
    "l1sparse": {"beta": None, "gamma": None, "forget_weight": None, "retain_weight": 1.0},  # FT on retain + l1
}
ADAMW_METHODS = ("ga", "graddiff", "npo", "simnpo", "l1sparse")


@dataclass
class UnlearnSettings:
    """Hyperparameters; None takes the method's default (METHOD_DEFAULTS). `lr` is AdamW's rate,
    or for ngdiff GeN's starting eta."""

    method: str
    epochs: int = 5
    lr: float = 1e-4
    batch_size: int = 8
    beta: float | None = None
    gamma: float | None = None
    forget_weight: float | None = None
    retain_weight: float | None = None
    gen_every: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0
    mask: str | None = None  # wagle | magnitude | random: only the top mask_ratio of weights move
    mask_ratio: float | None = None  # default 0.8 with a mask
    mask_gamma: float = WAGLE_GAMMA  # WAGLE's diagonal-Hessian scalar
    sam_rho: float | None = None  # sharpness-aware: smooth the forget loss over an L2 ball of this radius
    l1: float | None = None  # l1-sparse: gamma of the linearly decaying l1 penalty (l1sparse: default 1e-4)
    prune: float | None = None  # prune first: zero this fraction of the LoRA weights by magnitude, keep them zero
    coreset: float | None = None  # unlearn with this random fraction of the forget rows (evaluate on all)

    def resolved(self) -> UnlearnSettings:
        """Check every value and fill the method's defaults; one clear error for a bad one."""
        if self.method not in METHOD_DEFAULTS:
            raise SiftError(f"unknown unlearning method {self.method!r}: use one of {', '.join(METHOD_DEFAULTS)}")
        if self.epochs < 1 or self.batch_size < 1 or self.gen_every < 1:
            raise SiftError("epochs, batch size and gen-every must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SiftError(f"lr must be a positive number, got {self.lr}")
        out = copy.copy(self)
        extras = {
            "--mask": self.mask,
            "--sam": self.sam_rho,
            "--l1": self.l1 if self.method != "l1sparse" else None,
            "--prune": self.prune,
        }
        if self.method not in ADAMW_METHODS and any(v is not None for v in extras.values()):
            raise SiftError(
                f"{', '.join(k for k, v in extras.items() if v is not None)} apply to {', '.join(ADAMW_METHODS)}, not {self.method}"
            )
        if self.mask is not None and self.mask not in MASKS:
            raise SiftError(f"unknown --mask {self.mask!r}: use one of {', '.join(MASKS)}")
        if self.mask_ratio is not None and self.mask is None:
            raise SiftError("--mask-ratio needs --mask")
        out.mask_ratio = (0.8 if self.mask_ratio is None else float(self.mask_ratio)) if self.mask else None
        if out.mask_ratio is not None and not 0.0 < out.mask_ratio <= 1.0:
            raise SiftError(f"--mask-ratio must lie in (0, 1], got {self.mask_ratio}")
        if not (self.mask_gamma > 0 and math.isfinite(self.mask_gamma)):
            raise SiftError(f"--mask-gamma must be a positive number, got {self.mask_gamma}")
        if self.sam_rho is not None and not (self.sam_rho > 0 and math.isfinite(self.sam_rho)):
            raise SiftError(f"--sam must be a positive radius, got {self.sam_rho}")
        if self.sam_rho is not None and self.method == "l1sparse":
            raise SiftError("--sam smooths a forget loss; l1sparse has none (it fine-tunes on the retain rows)")
        if self.method == "l1sparse" and self.l1 is None:
            out.l1 = L1_DEFAULT
        if out.l1 is not None and not (out.l1 >= 0 and math.isfinite(out.l1)):
            raise SiftError(f"--l1 must be >= 0 and finite, got {self.l1}")
        if self.prune is not None and not 0.0 <= self.prune < 1.0:
            raise SiftError(f"--prune must lie in [0, 1), got {self.prune}")
        if self.coreset is not None and not 0.0 < self.coreset <= 1.0:
            raise SiftError(f"--coreset must lie in (0, 1], got {self.coreset}")
        for key, default in METHOD_DEFAULTS[self.method].items():
            given = getattr(self, key)
            if default is None:
                if given is not None:
                    raise SiftError(f"--{key.replace('_', '-')} does not apply to {self.method}")
                continue
            value = default if given is None else float(given)
            if (
                not math.isfinite(value)
                or (key == "beta" and value <= 0)
                or (key in ("forget_weight", "retain_weight") and value < 0)
            ):
                raise SiftError(
                    f"--{key.replace('_', '-')} must be {'> 0' if key == 'beta' else '>= 0'} and finite, got {given}"
                )
            setattr(out, key, value)
        return out

    def uses_retain(self) -> bool:
        return self.method == "ngdiff" or bool(self.retain_weight)


@dataclass
class Counter:
    """Tokens through the model: forward+backward (6 N per token) and forward only (2 N)."""

    trained_tokens: int = 0
    forward_tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _batch(examples: list[Example], idx: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return next(batches(examples, len(idx), idx, pad))


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
    from sift.train import tokenize_rows

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

    base = base or LazyBase(cfg.model.name, cfg.model.revision, state.base_model_fingerprint)
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
    seed = derive_seed("unlearn", s.seed, s.method)
    order_gen = torch.Generator().manual_seed(seed)
    retain = _retain_stream(len(ex_r), s.batch_size, derive_seed("unlearn-retain", s.seed)) if ex_r else None
    count = Counter()
    masks = _weight_masks(s, lm, params, ex_f, ex_r, pad, count)

    ref: torch.Tensor | None = None
    if s.method == "npo":  # pi_ref: the model before unlearning, scored once per forget row
        with torch.no_grad():
            ref = torch.cat([answer_logprobs(lm, _batch(ex_f, [i], pad))[0] for i in range(len(ex_f))])
        count.forward_tokens += sum(len(x) for x, _ in ex_f)

    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0) if s.method != "ngdiff" else None
    gen = GenSchedule(eta=s.lr, every=s.gen_every) if s.method == "ngdiff" else None
    step = 0
    hook_seconds = 0.0
    steps_total = s.epochs * math.ceil(len(ex_f) / s.batch_size)
    for epoch in range(1, s.epochs + 1):
        order = torch.randperm(len(ex_f), generator=order_gen).tolist()
        sums = {"forget_nll": 0.0, "retain_nll": 0.0, "loss": 0.0}
        n_steps = 0
        for start in range(0, len(order), s.batch_size):
            idx = order[start : start + s.batch_size]
            fb = _batch(ex_f, idx, pad)
            rb = _batch(ex_r, next(retain), pad) if (retain is not None and s.uses_retain()) else None  # type: ignore[arg-type]
            step += 1
            if s.method == "ngdiff":
                assert rb is not None and gen is not None
                loss_val, nll_f, nll_r = _ngdiff_step(lm, params, fb, rb, gen, step, count)
            else:
                assert optimizer is not None
                l1 = None if s.l1 is None else l1_weight(s.l1, epoch, s.epochs)
                if s.sam_rho is None:
                    lp_f, len_f = answer_logprobs(lm, fb)
                    nll_f_t = token_nll(lp_f, len_f)
                    nll_r_t = None
                    if rb is not None:
                        lp_r, len_r = answer_logprobs(lm, rb)
                        nll_r_t = token_nll(lp_r, len_r)
                    loss = _objective(s, lp_f, len_f, nll_f_t, nll_r_t, None if ref is None else ref[idx])
                    if l1 is not None:
                        loss = loss + l1 * l1_penalty(params)
                    loss.backward()
                else:
                    loss, nll_f_t, nll_r_t = _sam_step(s, lm, params, fb, rb, None if ref is None else ref[idx], l1)
                    count.trained_tokens += int(fb[1].sum())  # the third pass, at theta + delta
                if s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                if masks is not None:
                    apply_masks(params, masks)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_val, nll_f = float(loss.detach()), float(nll_f_t.detach())
                nll_r = float("nan") if nll_r_t is None else float(nll_r_t.detach())
                count.trained_tokens += int(fb[1].sum()) + (0 if rb is None else int(rb[1].sum()))
            sums["loss"] += loss_val
            sums["forget_nll"] += nll_f
            sums["retain_nll"] += nll_r
            n_steps += 1
        row = {"epoch": epoch, **{k: round(v / n_steps, 6) for k, v in sums.items()}}
        if gen is not None:
            row["eta"] = gen.eta
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

    staged = staging_dir(out)
    model.save_pretrained(str(staged), safe_serialization=True)
    (staged / "README.md").unlink(missing_ok=True)
    if (staged / "adapter_config.json").exists():
        from sift.train import canonical_adapter_config

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
        "steps": step,
        "planned_steps": steps_total,
        "seconds": round(seconds, 3),
        "flops_estimate": 6 * n_params * count.trained_tokens + 2 * n_params * count.forward_tokens,
        "history": count.history,
    }
    if masks is not None:
        record["mask"] = {"kind": s.mask, "prune": s.prune, "fraction_updated": round(mask_fraction(masks), 6)}
    if gen is not None:
        record["gen"] = {
            "final_eta": gen.eta,
            "accepted_fits": gen.accepted,
            "failed_fits": gen.failed,
            "every": gen.every,
            "eps": EPS,
        }
    atomic_write_json(staged / UNLEARN_META, record)
    replace_dir(staged, out)
    return record | {"out": str(out)}


def _objective(
    s: UnlearnSettings,
    lp_f: torch.Tensor,
    len_f: torch.Tensor,
    nll_f: torch.Tensor,
    nll_r: torch.Tensor | None,
    ref: torch.Tensor | None,
) -> torch.Tensor:
    """The method's loss: its forget term (_forget_term) plus w_R NLL_retain where it has one."""
    if s.method == "l1sparse":  # fine-tuning on the retain rows; its l1 term is added by the caller
        assert nll_r is not None
        return (s.retain_weight or 0.0) * nll_r
    forget = _forget_term(s, lp_f, len_f, nll_f, ref)
    if s.method == "ga":
        return forget
    if s.method == "graddiff":
        assert nll_r is not None
    return forget + ((s.retain_weight or 0.0) * nll_r if nll_r is not None else 0.0)


def _forget_term(
    s: UnlearnSettings, lp_f: torch.Tensor, len_f: torch.Tensor, nll_f: torch.Tensor, ref: torch.Tensor | None
) -> torch.Tensor:
    """The part of the loss that depends on the forget rows (what sharpness-aware unlearning smooths);
    graddiff's is objectives.graddiff_loss's first term."""
    if s.method == "ga":
        return ga_loss(nll_f)
    if s.method == "graddiff":
        return -(s.forget_weight or 0.0) * nll_f
    if s.method == "npo":
        assert ref is not None and s.beta is not None
        return npo_loss(lp_f, ref, s.beta)
    if s.method == "simnpo":
        assert s.beta is not None
        return (s.forget_weight or 0.0) * simnpo_loss(lp_f, len_f, s.beta, s.gamma or 0.0)
    raise AssertionError(s.method)  # pragma: no cover


def _sam_step(
    s: UnlearnSettings,
    lm: Any,
    params: list[torch.nn.Parameter],
    fb: Any,
    rb: Any,
    ref: torch.Tensor | None,
    l1: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of  l_f(theta + delta*) + w_R l_r(theta) [+ l1]  into p.grad (sift.unlearn.smoothing);
    returns (loss at theta, forget NLL, retain NLL) for the log."""
    seen: dict[str, torch.Tensor] = {}

    def forget_loss() -> torch.Tensor:
        lp_f, len_f = answer_logprobs(lm, fb)
        nll = token_nll(lp_f, len_f)
        seen.setdefault("nll_f", nll.detach())
        return _forget_term(s, lp_f, len_f, nll, ref)

    forget_value = sam_forget_backward(params, forget_loss, s.sam_rho or 0.0)
    rest: torch.Tensor | None = None
    nll_r = None
    if rb is not None and s.retain_weight:
        lp_r, len_r = answer_logprobs(lm, rb)
        nll_r = token_nll(lp_r, len_r)
        rest = s.retain_weight * nll_r
    if l1 is not None:
        rest = l1 * l1_penalty(params) if rest is None else rest + l1 * l1_penalty(params)
    if rest is not None:
        rest.backward()
    total = torch.tensor(forget_value) + (0.0 if rest is None else rest.detach())
    return total, seen["nll_f"], None if nll_r is None else nll_r.detach()


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
        grads = _grads(token_nll(*answer_logprobs(lm, _batch(examples, idx, pad))), params)
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


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """d loss / d params, zeros for a parameter the loss does not reach."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def _ngdiff_step(
    lm: Any, params: list[torch.nn.Parameter], fb: Any, rb: Any, gen: GenSchedule, step: int, count: Counter
) -> tuple[float, float, float]:
    """One NGDiff update (with a GeN fit when due); returns (retain - forget NLL, forget NLL, retain NLL)."""
    lp_r, len_r = answer_logprobs(lm, rb)
    loss_r = token_nll(lp_r, len_r)
    g_r = _grads(loss_r, params)
    lp_f, len_f = answer_logprobs(lm, fb)
    loss_f = token_nll(lp_f, len_f)
    g_f = _grads(loss_f, params)
    count.trained_tokens += int(rb[1].sum()) + int(fb[1].sum())
    direction = ngdiff_direction(g_r, g_f)
    l0 = float(loss_r.detach())
    if gen.due(step):
        with torch.no_grad():
            start = [p.detach().clone() for p in params]

            def retain_loss_at(t: float) -> float:  # L_R(theta + t g), theta restored by the caller
                for p, p0, g in zip(params, start, direction):
                    p.copy_(p0 + t * g)
                count.forward_tokens += int(rb[1].sum())
                return float(token_nll(*answer_logprobs(lm, rb)))

            l_plus, l_minus = retain_loss_at(gen.eta), retain_loss_at(-gen.eta)
            proposed = parabola_step(gen.eta, l_minus, l0, l_plus)
            good = proposed is not None and retain_loss_at(-gen.clipped(proposed)) < l0
            for p, p0 in zip(params, start):
                p.copy_(p0)
        gen.update(proposed, good)
    with torch.no_grad():
        for p, g in zip(params, direction):
            p.sub_(gen.eta * g)
    nll_f, nll_r = float(loss_f.detach()), l0
    return nll_r - nll_f, nll_f, nll_r
