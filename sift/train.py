"""Deterministic training of one shard (LoRA, or SIFT-Masks sign-fixed tuning): same rows + same config + same base => same bytes.

No state crosses shards: each shard starts from a fresh copy of the base model, its own seed
(derived from the config seed and the shard index), its own optimizer and batch order.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sift.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META, adapter_intact, check_mergeable_targets
from sift.config import SiftConfig
from sift.data import Row, shard_content_hash
from sift.determinism import derive_seed, enable_determinism
from sift.errors import SiftError
from sift.fsio import atomic_write_json, atomic_write_text, remove_tree, replace_dir, staging_dir
from sift.hashing import sha256_hex, shard_of, tensors_sha256
from sift.logs import get_logger, progress_enabled, quieted
from sift.loop import LoopResult, LoopSettings, batches, run_loop
from sift.models import BaseModel, LazyBase, example_ids
from sift.routing.routers import build_routers, router_settings, routers_current
from sift.siftmasks.store import DELTA_FILE, save_delta
from sift.siftmasks.tune import tune_sign_fixed
from sift.workspace import Workspace
from sift.workspace.view import WorkspaceView

log = get_logger(__name__)


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
    with pinned_threads(cfg.train.threads):
        return _train_shard(base, rows, cfg, shard, out_dir, content_hash, progress)


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to n (0: left as it is) for the duration."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_shard(
    base: BaseModel,
    rows: list[Row],
    cfg: SiftConfig,
    shard: int,
    out_dir: Path,
    content_hash: str,
    progress: Callable[[int, int, float], None] | None,
) -> TrainResult:
    enable_determinism()
    started = time.perf_counter()
    examples = tokenize_rows(base, rows, cfg.train.max_length)
    seed = shard_seed(cfg, shard)
    staged = staging_dir(out_dir)
    if cfg.train.slices > 1:
        digest, result, extra = _fit_lora_sliced(base, rows, cfg, shard, seed, staged, out_dir, progress)
        tokens = extra.pop("tokens_trained")
    else:
        fit = _fit_sift_masks if cfg.train.method == "sift-masks" else _fit_lora
        digest, result, extra = fit(base, examples, cfg, seed, staged, progress)
        tokens = cfg.train.epochs * sum(len(ids) for ids, _ in examples)
    build_routers(base, rows, cfg, staged, content_hash)
    seconds = time.perf_counter() - started
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


def _lora_model(base: BaseModel, cfg: SiftConfig, seed: int) -> tuple[Any, list[torch.nn.Parameter]]:
    """A fresh copy of the base with LoRA layers whose A matrices are drawn from `seed`."""
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
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def _save_lora(peft_model: Any, staged: Path) -> str:
    peft_model.eval()
    peft_model.save_pretrained(str(staged), safe_serialization=True)
    (staged / "README.md").unlink(missing_ok=True)  # peft's model card template; says nothing here
    canonical_adapter_config(staged / ADAPTER_CONFIG)
    return tensors_sha256(load_file(str(staged / ADAPTER_WEIGHTS)))[0]


def canonical_adapter_config(path: Path) -> None:
    """Rewrite peft's adapter_config.json with sorted keys and sorted module lists: peft stores
    target_modules from a set, so its order followed Python's per-process string hashing and two
    identical runs wrote different files."""
    data = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fit_lora(
    base: BaseModel,
    examples: list,
    cfg: SiftConfig,
    seed: int,
    staged: Path,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[str, LoopResult, dict[str, Any]]:
    """One LoRA adapter (peft), saved in peft's format."""
    peft_model, params = _lora_model(base, cfg, seed)
    t = cfg.train
    settings = LoopSettings(t.epochs, t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.max_grad_norm)
    peft_model.train()
    lm = peft_model.base_model.model  # the causal LM, with the LoRA layers injected in place
    result = run_loop(
        lm,
        params,
        examples,
        base.tokenizer.pad_token_id,
        settings,
        seed,
        loss_fn=lambda m, b: completion_loss(m, *b),
        progress=progress,
    )
    return _save_lora(peft_model, staged), result, {}


# -- SISA slices ---------------------------------------------------------------------------------

SLICES_DIR = "slices"
_STAGES = "stages.json"


def slice_of(group: str, slices: int) -> int:
    """A row's slice (0-based): a hash of its group key (owner or id) salted apart from the shard
    hash, so that one shard's rows spread over every slice and one owner's rows share a slice."""
    return shard_of("slice\0" + group, slices)


def slice_epochs(epochs: int, slices: int) -> list[int]:
    """SISA's allotment: stage r trains int((r+1) e') - int(r e') epochs, e' = 2e/(R+1), so that the
    stages together see about as many rows as e epochs over the whole shard."""
    per = 2 * epochs / (slices + 1)
    return [int((r + 1) * per) - int(r * per) for r in range(slices)]


def stage_hash(cfg: SiftConfig, base_fingerprint: str, shard: int, stage: int, prefix: list[Row]) -> str:
    """Names a stage's checkpoint: the rows it has seen (slices 0..stage), the config, the base."""
    return sha256_hex(
        f"stage {stage}|".encode() + shard_content_hash(cfg.training_hash(), base_fingerprint, shard, prefix).encode()
    )


def read_stages(adapter_dir: Path) -> list[dict[str, Any]]:
    try:
        return json.loads((adapter_dir / SLICES_DIR / _STAGES).read_text())["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _fit_lora_sliced(
    base: BaseModel,
    rows: list[Row],
    cfg: SiftConfig,
    shard: int,
    seed: int,
    staged: Path,
    previous: Path,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[str, LoopResult, dict[str, Any]]:
    """SISA (Bourtoule et al. 2021) on one shard: stage r trains the adapter left by stage r - 1 on
    slices 0..r with a fresh optimizer and a seed of its own, and saves the LoRA tensors.

    A stage's result depends only on the previous checkpoint, its rows and the config, so a stage
    whose rows are unchanged (every stage before the first slice that lost a row) is taken from
    `previous` instead of trained, and everything after it is bit-identical to training from
    scratch. A checkpoint is reused only when its recorded stage hash matches the current rows and
    its tensors match their recorded hash, so no kept checkpoint has seen a deleted row."""
    R, t = cfg.train.slices, cfg.train
    ordered = sorted(rows, key=lambda r: r.id)
    where = {r.id: slice_of(r.group, R) for r in ordered}
    epochs = slice_epochs(t.epochs, R)
    old = {int(e["stage"]): e for e in read_stages(previous)}
    peft_model, params = _lora_model(base, cfg, seed)
    peft_model.train()
    lm = peft_model.base_model.model
    (staged / SLICES_DIR).mkdir()
    stages: list[dict[str, Any]] = []
    steps = tokens = 0
    loss = float("nan")
    reusing = True
    for r in range(R):
        prefix = [row for row in ordered if where[row.id] <= r]
        digest = stage_hash(cfg, base.fingerprint, shard, r, prefix)
        name = f"stage-{r:02d}.safetensors"
        kept = old.get(r) if reusing else None
        state = _load_checkpoint(previous / SLICES_DIR / name, kept, digest) if kept else None
        if state is not None:
            with torch.no_grad():
                for n, p in peft_model.named_parameters():
                    if n in state:
                        p.copy_(state[n])
            shutil.copyfile(previous / SLICES_DIR / name, staged / SLICES_DIR / name)
            stages.append({**kept, "reused": True})
            loss = float(kept.get("final_loss", loss))
            continue
        reusing = False
        examples = tokenize_rows(base, prefix, t.max_length)
        stage_seed = derive_seed("slice", seed, r)
        torch.manual_seed(stage_seed)  # LoRA dropout, if any, draws from the global generator
        settings = LoopSettings(epochs[r], t.batch_size, t.lr, t.weight_decay, t.warmup_steps, t.max_grad_norm)
        result = (
            run_loop(
                lm,
                params,
                examples,
                base.tokenizer.pad_token_id,
                settings,
                stage_seed,
                loss_fn=lambda m, b: completion_loss(m, *b),
                progress=progress,
            )
            if examples and epochs[r]
            else LoopResult(0, loss)
        )
        steps += result.steps
        tokens += epochs[r] * sum(len(ids) for ids, _ in examples)
        loss = result.final_loss
        tensors = {n: p.detach().clone().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
        save_file(tensors, str(staged / SLICES_DIR / name), metadata={"format": "pt"})
        stages.append(
            {
                "stage": r,
                "stage_hash": digest,
                "rows": len(prefix),
                "epochs": epochs[r],
                "steps": result.steps,
                "final_loss": loss,
                "sha256": tensors_sha256(tensors)[0],
                "reused": False,
            }
        )
    atomic_write_json(
        staged / SLICES_DIR / _STAGES,
        {"slices": R, "stages": [{k: v for k, v in e.items() if k != "reused"} for e in stages]},
    )
    first = next((e["stage"] for e in stages if not e["reused"]), R)
    extra = {
        "slices": R,
        "resumed_from_stage": first,
        "stages_reused": sum(e["reused"] for e in stages),
        "tokens_trained": tokens,
    }
    return _save_lora(peft_model, staged), LoopResult(steps, loss), extra


def _load_checkpoint(path: Path, entry: dict[str, Any], digest: str) -> dict[str, torch.Tensor] | None:
    """A stage's tensors, only if they are the ones recorded for exactly these rows."""
    if entry.get("stage_hash") != digest:
        return None
    try:
        state = load_file(str(path))
    except Exception:
        return None
    return state if tensors_sha256(state)[0] == entry.get("sha256") else None


def _fit_sift_masks(
    base: BaseModel,
    examples: list,
    cfg: SiftConfig,
    seed: int,
    staged: Path,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[str, LoopResult, dict[str, Any]]:
    """Sign-fixed full fine-tuning of the target weights; saves the mask and the masked delta."""
    model = copy.deepcopy(base.model)
    deltas, result = tune_sign_fixed(
        model,
        examples,
        base.tokenizer.pad_token_id,
        cfg,
        seed,
        loss_fn=lambda m, b: completion_loss(m, *b),
        progress=progress,
    )
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
            if "bar" not in bar or step == 1:  # a new bar per run of the loop (SISA stages run several)
                bar["bar"] = tqdm(total=total, desc=label, file=sys.stderr, leave=False, unit="step")
            bar["bar"].update(1)
            bar["bar"].set_postfix(loss=f"{loss:.3f}")
            if step == total:
                bar["bar"].close()

        return update

    def report(step: int, total: int, loss: float) -> None:
        if total >= 20 and step < total and step % (total // 4) == 0:
            log.info(f"{label}: step {step}/{total} loss {loss:.4f}")

    return report


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
    shard_locks: bool = False,
) -> dict[str, Any]:
    """Train every selected shard whose adapter is missing or stale; skip the rest (rebuilding
    only their router files when the serving settings changed).

    `shard_locks`: the caller holds the workspace lock shared with other trainers, so each shard
    is planned and written under its own lock (a shard another trainer finished is 'unchanged').
    Returns a summary: per shard 'trained', 'unchanged', 'empty' or 'dropped'. Progress is logged
    (the "sift" logger); `quiet` silences it for this call."""
    with quieted(quiet):
        return _train_shards(ws, shards, base, view, shard_locks)


def _train_shards(
    ws: Workspace, shards: list[int] | None, base: LazyBase | None, view: WorkspaceView | None, shard_locks: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    view = view or WorkspaceView.load(ws)
    cfg, state = view.cfg, view.state
    base = base or LazyBase(cfg.model.name, cfg.model.revision, state.base_model_fingerprint)
    status: dict[int, str] = {}
    results: list[TrainResult] = []
    todo = shards if shards is not None else list(range(view.num_shards))
    for shard in todo:
        with ws.shard_lock(shard) if shard_locks else contextlib.nullcontext():
            res = _train_one(ws, view, base, cfg, state, shard, fresh=shard_locks, status=status)
        if res is not None:
            results.append(res)
    view.forget_plans()
    return {
        "shards": {str(k): v for k, v in sorted(status.items())},
        "trained": [r.shard for r in results],
        "unchanged": sorted(s for s, v in status.items() if v == "unchanged"),
        "steps": sum(r.steps for r in results),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _train_one(
    ws: Workspace,
    view: WorkspaceView,
    base: LazyBase,
    cfg: SiftConfig,
    state: Any,
    shard: int,
    fresh: bool,
    status: dict[int, str],
) -> TrainResult | None:
    """Bring one shard up to date; records what happened in `status`."""
    plan = view.plan(shard, fresh=fresh)
    adir = ws.adapter_dir(shard)
    if plan.status == "dropped":
        status[shard] = "dropped"
        return None
    if plan.status == "empty":
        remove_tree(adir)
        status[shard] = "empty"
        return None
    assert plan.content_hash is not None
    if plan.status == "current" and not adapter_intact(adir):
        log.warning(f"shard {shard:>3}: its adapter file does not match its recorded hash (damaged); retraining")
    elif plan.status == "current":
        if not routers_current(adir, router_settings(cfg, state.base_model_fingerprint, plan.content_hash)):
            build_routers(base.get(), plan.rows, cfg, adir, plan.content_hash)
        status[shard] = "unchanged"
        return None
    label = f"shard {shard:>3} ({len(plan.rows)} rows)"
    res = train_shard(
        base.get(),
        plan.rows,
        cfg,
        shard,
        adir,
        plan.content_hash,
        stderr_progress(label) if progress_enabled() else None,
    )
    log.info(f"{label}: trained {res.steps} steps in {res.seconds:.1f}s, final loss {res.final_loss:.4f}")
    status[shard] = "trained"
    return res


# -- several trainers on one workspace ---------------------------------------------------------


def launch_rank() -> tuple[int, int]:
    """(rank, world size) as `accelerate launch` and torchrun set them (RANK, WORLD_SIZE);
    (0, 1) for a plain process."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise SiftError("RANK and WORLD_SIZE must be integers (they are set by accelerate launch / torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise SiftError(f"RANK {rank} does not fit WORLD_SIZE {world}")
    return rank, world


def rank_shards(view: WorkspaceView, shards: list[int], rank: int, world: int) -> list[int]:
    """This rank's part of `shards`: most rows first to the least-loaded rank (ties to the lower
    rank). Every rank computes the same split with no messages, from the rows alone: whether a
    shard is already trained changes while other ranks work, so it must not steer the split."""
    cost = {s: len(view.rows.get(s, [])) for s in shards}
    load, mine = [0] * world, {r: [] for r in range(world)}
    for s in sorted(shards, key=lambda s: (-cost[s], s)):
        r = min(range(world), key=lambda i: (load[i], i))
        mine[r].append(s)
        load[r] += cost[s]
    return sorted(mine[rank])
