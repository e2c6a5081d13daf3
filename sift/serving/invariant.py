"""Greedy decoding whose answer to a prompt does not depend on what it is batched with.

A batched generation is fast, but on a CPU it gives other bytes than the same prompt alone:
a matrix product's kernel (and so its order of summation) is chosen by the number of rows, and
the fused attention kernel splits its work by the batch size, so a logit can move in its last
bit and, some tokens later, flip an argmax. Two changes make every prompt's arithmetic the same
whatever its neighbours:

- every linear layer sees at least `min_rows` rows (zero rows are appended and their outputs
  dropped, by hooks on each nn.Linear): a product's rows are independent, and from that many
  rows on the kernel, and its summation order, no longer depend on the count (checked on the
  model by `probe`);
- attention runs one sequence at a time, on that sequence's own tokens only (its left padding
  cut away), through transformers' own SDPA function with no mask: the exact call the prompt
  alone makes.

Everything else in a decoder layer (embeddings, norms, rotary positions, activations) works row
by row. So `greedy_batch` gives each prompt the same token ids whether it runs alone or with
15 others, and `probe` checks that on the served model before a server relies on it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sift.models import model_device

ATTENTION = "sift_rowwise"
DEFAULT_MIN_ROWS = 16

_local = threading.local()  # the pads of the batch being decoded, read by the attention function


def _pad_rows(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook of a linear layer: fewer than `min_rows` rows get zero rows appended."""
    need = getattr(_local, "min_rows", 0)
    x = args[0]
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if not 0 < rows < need:
        return None
    module._sift_rows = (rows, x.shape)  # type: ignore[assignment]
    flat = x.reshape(rows, x.shape[-1])
    return (torch.cat([flat, flat.new_zeros(need - rows, x.shape[-1])]), *args[1:])


def _unpad_rows(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a linear layer: the appended rows' outputs dropped, the input's shape back."""
    info = module.__dict__.pop("_sift_rows", None)
    if info is None:
        return None
    rows, shape = info
    return out[:rows].reshape(*shape[:-1], out.shape[-1])


def _rowwise_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention one sequence at a time over its own tokens, as the sequence alone gets it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pads: list[int] | None = getattr(_local, "pads", None)
    if pads is None or len(pads) != query.shape[0]:
        raise RuntimeError("sift's row-wise attention runs only inside greedy_batch")
    q_len = query.shape[2]
    outs = []
    for i, pad in enumerate(pads):
        # prefill: the queries of the real tokens only; a decoding step: the one query
        start = pad if q_len > 1 else 0
        q = query[i : i + 1, :, start:]
        out, _ = sdpa_attention_forward(module, q, key[i : i + 1, :, pad:], value[i : i + 1, :, pad:], None, **kwargs)
        if start:  # the padded positions' outputs are never read: zeros
            out = torch.cat([out.new_zeros(1, start, *out.shape[2:]), out], dim=1)
        outs.append(out)
    return torch.cat(outs), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _rowwise_attention)


@contextlib.contextmanager
def _invariant(model: Any, pads: list[int], min_rows: int) -> Iterator[None]:
    """Row padding on every linear layer (peft's LoRA A and B included: they are nn.Linear too)
    and row-wise attention, for the duration of one batched decoding."""
    _register()
    before = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation(ATTENTION)
    handles = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            handles.append(m.register_forward_pre_hook(_pad_rows))
            handles.append(m.register_forward_hook(_unpad_rows))
    _local.pads, _local.min_rows = pads, min_rows
    try:
        yield
    finally:
        _local.pads, _local.min_rows = None, 0
        for h in handles:
            h.remove()
        if before is not None:
            model.set_attn_implementation(before)


@torch.no_grad()
def greedy_batch(
    model: Any,
    tokenizer: Any,
    prompts_ids: list[list[int]],
    max_new_tokens: list[int] | int,
    min_rows: int = DEFAULT_MIN_ROWS,
    on_step: Callable[[list[int | None]], Any] | None = None,
    scores: list[torch.Tensor] | None = None,
    adapter_names: list[str] | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt's greedy answer (up to and without the end-of-sequence
    token), the same for a prompt whatever else is in the batch. `max_new_tokens` per prompt or
    for all. `on_step(tokens)`: called after each step with every row's new token (None for a
    row that has finished); it may return row indices to finish there (a client that went away,
    a stop string seen). `scores`: when given, each step's logits are appended to it.
    `adapter_names`: one peft adapter per row (a peft model holding them all): peft's mixed
    batch, whose rows get their own adapter's LoRA term by the same operations as alone."""
    from transformers import DynamicCache

    n = len(prompts_ids)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if n == 0:
        return []
    width = max(len(p) for p in prompts_ids)
    pads = [width - len(p) for p in prompts_ids]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    device = model_device(model)
    ids = torch.tensor([[pad_id] * pad + p for pad, p in zip(pads, prompts_ids)], dtype=torch.long).to(device)
    positions = torch.tensor([[0] * pad + list(range(len(p))) for pad, p in zip(pads, prompts_ids)]).to(device)
    out: list[list[int]] = [[] for _ in range(n)]
    done = [limit <= 0 for limit in limits]
    cache = DynamicCache()
    extra = {"adapter_names": list(adapter_names)} if adapter_names is not None else {}
    with _invariant(model, pads, min_rows):
        logits = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, **extra).logits[:, -1]
        for _ in range(max(limits)):
            if scores is not None:
                scores.append(logits.clone())
            nxt = logits.argmax(dim=-1).tolist()
            fresh: list[int | None] = [None] * n
            for i, tok in enumerate(nxt):
                if done[i]:
                    continue
                if tok in eos_ids:
                    done[i] = True
                    continue
                out[i].append(tok)
                fresh[i] = tok
                if len(out[i]) >= limits[i]:
                    done[i] = True
            if on_step is not None:
                for i in on_step(fresh) or ():
                    done[i] = True
            if all(done):
                break
            feed = torch.tensor([[t if not d else pad_id] for t, d in zip(nxt, done)], dtype=torch.long).to(device)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=feed, position_ids=positions, cache=cache, use_cache=True, **extra).logits[:, -1]
    return out


@dataclass(frozen=True)
class ProbeResult:
    invariant: bool
    detail: str


PROBE_PROMPTS = (
    "What is the capital of France?",
    "Name a colour.",
    "Who wrote the play Hamlet, and in which century did he live?",
    "How many legs does a spider have?",
    "Say hello.",
)


def probe(
    model: Any, tokenizer: Any, prompts_ids: list[list[int]], max_new_tokens: int = 6, min_rows: int = DEFAULT_MIN_ROWS
) -> ProbeResult:
    """Decode `prompts_ids` (of several lengths) alone and all together and compare every step's
    logits bit for bit: a server batches only where they agree on its own model, since which
    kernels a machine picks is the machine's."""
    together: list[torch.Tensor] = []
    greedy_batch(model, tokenizer, prompts_ids, max_new_tokens, min_rows, scores=together)
    for i, p in enumerate(prompts_ids):
        alone: list[torch.Tensor] = []
        greedy_batch(model, tokenizer, [p], max_new_tokens, min_rows, scores=alone)
        for step, row in enumerate(alone):
            if not torch.equal(row[0], together[step][i]):
                return ProbeResult(
                    False, f"prompt {i}'s logits at step {step} differ alone and in a batch of {len(prompts_ids)}"
                )
    return ProbeResult(True, f"{len(prompts_ids)} prompts: every step's logits alike alone and in one batch")
