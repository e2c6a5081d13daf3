"""Greedy decoding, shared by `sift generate`, the benchmarks and evaluation."""

from __future__ import annotations

from typing import Any

import torch

from sift.models import PromptFormat, left_pad, model_device, prompt_ids


@torch.no_grad()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    fmt: PromptFormat | None = None,
    shots: tuple[tuple[str, str], ...] = (),
) -> list[str]:
    """Greedy answers, batched with left padding (the attention mask keeps pads out);
    batch_size=1 answers each prompt alone, with no padding at all. `fmt` and `shots` pose the
    questions another way (an evaluation's template, in-context examples)."""
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [prompt_ids(tokenizer, p, fmt, shots) for p in prompts[start : start + batch_size]]
        ids, mask = left_pad(chunk, pad)
        width = ids.shape[1]
        device = model_device(model)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out
