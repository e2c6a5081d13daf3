"""The LoRA side of shard training: the loss on the completion tokens, tokenization of rows, a
fresh LoRA model drawn from a seed, and the adapter saved in peft's format with a canonical
config (same rows, config and base => same bytes)."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sift.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_mergeable_targets
from sift.config import SiftConfig
from sift.data import Row
from sift.fsio import atomic_write_text
from sift.hashing import tensors_sha256
from sift.models import BaseModel, example_ids, restored_on_exit

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


def lora_model(base: BaseModel, cfg: SiftConfig, seed: int) -> tuple[Any, list[torch.nn.Parameter]]:
    """A fresh copy of the base with LoRA layers whose A matrices are drawn from `seed` (for a
    caller that keeps the model; training uses `lora_on_base`, which copies nothing)."""
    return _inject(copy.deepcopy(base.model), cfg, seed)


@contextlib.contextmanager
def lora_on_base(base: BaseModel, cfg: SiftConfig, seed: int) -> Iterator[tuple[Any, list[torch.nn.Parameter]]]:
    """LoRA layers injected into the base itself, and taken out again on the way out, whatever
    happens (a refused target included): no second copy of the base per shard (13.5 GB for a 7 B
    model in bf16). The base's weights are never written (they are frozen); its modules,
    train/eval mode, requires_grad flags and input hooks are restored, so its hash is the same
    afterwards (tests/test_compute.py)."""
    from peft import get_peft_model

    model = base.model
    had = {attr: attr in model.__dict__ for attr in ("peft_config", "_hf_peft_config_loaded")}
    peft_model = None
    with restored_on_exit(model, cfg.compute.gradient_checkpointing):
        try:
            torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
            peft_model = get_peft_model(model, _lora_config(cfg))
            check_mergeable_targets(peft_model)  # refuse before the first step, not at merge time
            yield peft_model, [p for p in peft_model.parameters() if p.requires_grad]
        finally:
            if peft_model is not None:
                peft_model.base_model.unload()  # the original modules back in place of the LoRA ones
            for attr, present in had.items():
                if not present and attr in model.__dict__:
                    delattr(model, attr)


def _lora_config(cfg: SiftConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _inject(model: Any, cfg: SiftConfig, seed: int) -> tuple[Any, list[torch.nn.Parameter]]:
    from peft import get_peft_model

    torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
    peft_model = get_peft_model(model, _lora_config(cfg))
    check_mergeable_targets(peft_model)  # refuse before the first step, not at merge time
    return peft_model, [p for p in peft_model.parameters() if p.requires_grad]


def save_lora(peft_model: Any, staged: Path) -> str:
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


def use_checkpointing(lm: Any, cfg: SiftConfig) -> None:
    """Gradient checkpointing when [compute] asks for it: activations are recomputed in the
    backward pass instead of kept (a 7 B shard's 15-20 GB of activations become about 2 GB).
    Non-reentrant, so it works with a frozen base whose inputs need no gradient."""
    if not cfg.compute.gradient_checkpointing:
        return
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
