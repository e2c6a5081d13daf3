"""SISA slices (Bourtoule et al. 2021) within a shard: each shard trains over R cumulative
slices of its rows and keeps a checkpoint after each, so a forget retrains only from the first
slice that held a deleted row, and what follows is bit-identical to training from scratch."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sift.config import SiftConfig
from sift.data import Row, shard_content_hash
from sift.determinism import derive_seed
from sift.fsio import atomic_write_json
from sift.hashing import sha256_hex, shard_of, tensors_sha256
from sift.loop import LoopResult, LoopSettings, run_loop
from sift.models import BaseModel
from sift.train.lora import completion_loss, lora_on_base, save_lora, tokenize_rows, use_checkpointing

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


def fit_lora_sliced(
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
    with lora_on_base(base, cfg, seed) as (peft_model, params):
        return _fit_stages(
            base, ordered, where, epochs, old, cfg, shard, seed, staged, previous, progress, peft_model, params
        )


def _fit_stages(
    base: BaseModel,
    ordered: list[Row],
    where: dict[str, int],
    epochs: list[int],
    old: dict[int, dict[str, Any]],
    cfg: SiftConfig,
    shard: int,
    seed: int,
    staged: Path,
    previous: Path,
    progress: Callable[[int, int, float], None] | None,
    peft_model: Any,
    params: list[torch.nn.Parameter],
) -> tuple[str, LoopResult, dict[str, Any]]:
    """The stages of fit_lora_sliced, on the base with the shard's LoRA layers in it."""
    R, t = cfg.train.slices, cfg.train
    peft_model.train()
    lm = peft_model.base_model.model
    use_checkpointing(lm, cfg)
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
        settings = LoopSettings.for_training(t, epochs=epochs[r])
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
    return save_lora(peft_model, staged), LoopResult(steps, loss), extra


def _load_checkpoint(path: Path, entry: dict[str, Any], digest: str) -> dict[str, torch.Tensor] | None:
    """A stage's tensors, only if they are the ones recorded for exactly these rows."""
    if entry.get("stage_hash") != digest:
        return None
    try:
        state = load_file(str(path))
    except Exception:
        return None
    return state if tensors_sha256(state)[0] == entry.get("sha256") else None
