"""Deterministic training of one shard (LoRA, or SIFT-Masks sign-fixed tuning): same rows + same config + same base => same bytes.

No state crosses shards: each shard starts from a fresh copy of the base model, its own seed
(derived from the config seed and the shard index), its own optimizer and batch order.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import load_file

from sift.adapters import ADAPTER_WEIGHTS, META, check_mergeable_targets
from sift.config import SiftConfig
from sift.data import Row
from sift.determinism import derive_seed, enable_determinism
from sift.errors import SiftError
from sift.fsio import atomic_write_json, remove_tree, replace_dir, staging_dir
from sift.hashing import tensors_sha256
from sift.loop import LoopResult, LoopSettings, batches, run_loop
from sift.models import BaseModel, LazyBase, example_ids
from sift.siftmasks.store import DELTA_FILE, save_delta
from sift.siftmasks.tune import tune_sign_fixed
from sift.serving.route import build_routers, router_settings, routers_current
from sift.snapshot import WorkspaceView
from sift.workspace import Workspace


@dataclass
class TrainResult:
    shard: int
    rows: int
    steps: int
    seconds: float
    final_loss: float
    adapter_sha256: str


def shard_seed(cfg: SiftConfig, shard: int) -> int:
    return derive_seed("shard", cfg.train.seed, shard)


_batches = batches  # the old name, kept for callers


# Architectures whose logits are exactly lm_head(last hidden state): for these the loss can skip
# the vocabulary projection at positions without a label (prompt, padding), a third of a step.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3"}


def completion_loss(lm: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens: the same value as transformers'
    `model(labels=...).loss`, computed on labelled positions only where the architecture allows."""
    if getattr(lm.config, "model_type", None) not in _PLAIN_HEAD:
        return lm(input_ids=ids, attention_mask=mask, labels=labels).loss
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def tokenize_rows(base: BaseModel, rows: list[Row], max_length: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for row in sorted(rows, key=lambda r: r.id):
        ids, labels = example_ids(base.tokenizer, row.prompt, row.completion, row.text)
        out.append((ids[:max_length], labels[:max_length]))
    return out


def train_shard(
    base: BaseModel,
    rows: list[Row],
    cfg: SiftConfig,
    shard: int,
    out_dir: Path,
    content_hash: str,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune one shard (a LoRA adapter, or a SIFT-Masks sign-fixed delta, as train.method
    says) and write it, sift-meta.json and the shard's router files to `out_dir` atomically: a
    crash leaves the previous adapter or none, never half of one."""
    enable_determinism()
    started = time.perf_counter()
    examples = tokenize_rows(base, rows, cfg.train.max_length)
    seed = shard_seed(cfg, shard)
    staged = staging_dir(out_dir)
    fit = _fit_sift_masks if cfg.train.method == "sift-masks" else _fit_lora
    digest, result, extra = fit(base, examples, cfg, seed, staged, progress)
    build_routers(base, rows, cfg, staged, content_hash)
    seconds = time.perf_counter() - started
    tokens = cfg.train.epochs * sum(len(ids) for ids, _ in examples)
    atomic_write_json(
        staged / META,
        {
            "shard": shard,
            "method": cfg.train.method,
            "content_hash": content_hash,
            "adapter_sha256": digest,
            "rows": len(rows),
            "steps": result.steps,
            "seed": seed,
            "final_loss": result.final_loss,
            "seconds": round(seconds, 3),
            # every epoch runs each example once: 6 N FLOPs per token (forward + backward)
            "tokens_trained": tokens,
            "flops_estimate": 6 * sum(p.numel() for p in base.model.parameters()) * tokens,
            "torch_threads": torch.get_num_threads(),
            **extra,
        },
    )
    replace_dir(staged, out_dir)
    return TrainResult(shard, len(rows), result.steps, seconds, result.final_loss, digest)


def _fit_lora(base: BaseModel, examples: list, cfg: SiftConfig, seed: int, staged: Path,
              progress: Callable[[int, int, float], None] | None) -> tuple[str, LoopResult, dict[str, Any]]:
    """One LoRA adapter (peft), saved in peft's format."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base.model)
    torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    check_mergeable_targets(peft_model)  # refuse before the first step, not at merge time
    params = [p for p in peft_model.parameters() if p.requires_grad]
    t = cfg.train
    settings = LoopSettings(t.epochs, t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.max_grad_norm)
    peft_model.train()
    lm = peft_model.base_model.model  # the causal LM, with the LoRA layers injected in place
    result = run_loop(lm, params, examples, base.tokenizer.pad_token_id, settings, seed,
                      loss_fn=lambda m, b: completion_loss(m, *b), progress=progress)
    peft_model.eval()
    peft_model.save_pretrained(str(staged), safe_serialization=True)
    (staged / "README.md").unlink(missing_ok=True)  # peft's model card template; says nothing here
    digest = tensors_sha256(load_file(str(staged / ADAPTER_WEIGHTS)))[0]
    return digest, result, {}


def _fit_sift_masks(base: BaseModel, examples: list, cfg: SiftConfig, seed: int, staged: Path,
                    progress: Callable[[int, int, float], None] | None) -> tuple[str, LoopResult, dict[str, Any]]:
    """Sign-fixed full fine-tuning of the target weights; saves the mask and the masked delta."""
    model = copy.deepcopy(base.model)
    deltas, result = tune_sign_fixed(model, examples, base.tokenizer.pad_token_id, cfg, seed,
                                     loss_fn=lambda m, b: completion_loss(m, *b), progress=progress)
    del model
    digest = save_delta(staged / DELTA_FILE, deltas)
    tuned = sum(t.numel() for t in deltas.values())
    moved = sum(int((t != 0).sum()) for t in deltas.values())
    return digest, result, {"tuned_weights": tuned, "mask_ones": moved, "sign_seed": cfg.sift_masks.sign_seed}


def stderr_progress(label: str) -> Callable[[int, int, float], None]:
    """A tqdm bar on a terminal; on a pipe or log, a line at 25 % steps."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar: dict[str, Any] = {}

        def update(step: int, total: int, loss: float) -> None:
            if "bar" not in bar:
                bar["bar"] = tqdm(total=total, desc=label, file=sys.stderr, leave=False, unit="step")
            bar["bar"].update(1)
            bar["bar"].set_postfix(loss=f"{loss:.3f}")
            if step == total:
                bar["bar"].close()

        return update

    def log(step: int, total: int, loss: float) -> None:
        if total >= 20 and step < total and step % (total // 4) == 0:
            print(f"{label}: step {step}/{total} loss {loss:.4f}", file=sys.stderr, flush=True)

    return log


def parse_shard_spec(spec: str | None, num_shards: int) -> list[int]:
    """`0-3,7` -> [0, 1, 2, 3, 7]; None -> every shard."""
    if spec is None:
        return list(range(num_shards))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise SiftError(f"bad shard list {spec!r}: use e.g. 0-3,7") from None
    bad = sorted(s for s in out if not 0 <= s < num_shards)
    if bad:
        raise SiftError(f"shard {bad[0]} is out of range: this workspace has shards 0-{num_shards - 1}")
    return sorted(out)


def train_shards(
    ws: Workspace,
    shards: list[int] | None = None,
    base: LazyBase | None = None,
    quiet: bool = False,
    view: WorkspaceView | None = None,
) -> dict[str, Any]:
    """Train every selected shard whose adapter is missing or stale; skip the rest (rebuilding
    only their router files when the serving settings changed).

    Returns a summary: per shard 'trained', 'unchanged', 'empty' or 'dropped'."""
    started = time.perf_counter()
    view = view or WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    base = base or LazyBase(cfg.model.name, cfg.model.revision, state.base_model_fingerprint)
    status: dict[int, str] = {}
    results: list[TrainResult] = []
    todo = shards if shards is not None else list(range(view.num_shards))
    for shard in todo:
        plan = view.plan(shard)
        adir = ws.adapter_dir(shard)
        if plan.status == "dropped":
            status[shard] = "dropped"
            continue
        if plan.status == "empty":
            remove_tree(adir)
            status[shard] = "empty"
            continue
        assert plan.content_hash is not None
        if plan.status == "current":
            if not routers_current(adir, router_settings(cfg, state.base_model_fingerprint, plan.content_hash)):
                build_routers(base.get(), plan.rows, cfg, adir, plan.content_hash)
            status[shard] = "unchanged"
            continue
        label = f"shard {shard:>3} ({len(plan.rows)} rows)"
        res = train_shard(base.get(), plan.rows, cfg, shard, adir, plan.content_hash, None if quiet else stderr_progress(label))
        if not quiet:
            print(f"{label}: trained {res.steps} steps in {res.seconds:.1f}s, final loss {res.final_loss:.4f}", file=sys.stderr, flush=True)
        results.append(res)
        status[shard] = "trained"
    view.forget_plans()
    return {
        "shards": {str(k): v for k, v in sorted(status.items())},
        "trained": [r.shard for r in results],
        "unchanged": sorted(s for s, v in status.items() if v == "unchanged"),
        "steps": sum(r.steps for r in results),
        "seconds": round(time.perf_counter() - started, 3),
    }
