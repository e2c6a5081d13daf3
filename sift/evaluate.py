"""Recall of trained facts by greedy decoding: did the model learn (or forget) them?"""

from __future__ import annotations

import re
from typing import Any

import torch

from sift.models import prompt_ids


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Batched greedy decoding with left padding (the attention mask keeps pads out)."""
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out


def fact_recall(answers: list[str], rows: list[dict[str, Any]]) -> dict[str, float]:
    """exact: the answer is the trained completion (normalised); contains: the fact's value appears."""
    exact = sum(normalize(a) == normalize(r["completion"]) for a, r in zip(answers, rows))
    contains = sum(normalize(r["answer"]) in normalize(a) for a, r in zip(answers, rows))
    n = max(1, len(rows))
    return {"n": len(rows), "exact": exact / n, "contains": contains / n}
