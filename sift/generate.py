"""Ask the served model (or one shard's adapter, for a request routed to its owner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sift.errors import SiftError
from sift.models import prompt_ids


def load_served(folder: Path) -> tuple[Any, Any]:
    """The merged model as any user would load it: plain transformers, safetensors only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(folder.glob("*.safetensors")):
        raise SiftError(f"{folder} holds no served model; run `sift merge`")
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def load_routed(base_model: Any, adapter_dir: Path) -> Any:
    """Base + one shard's adapter, through peft's own loader."""
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()


@torch.no_grad()
def answer(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy answers, one prompt at a time (no padding effects on the result)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out
