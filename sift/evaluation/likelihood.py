"""Per-answer likelihoods and greedy answers under one model: what every metric is computed from.

A (question, answer) pair is tokenised exactly as training tokenises a row (sift.models.example_ids:
the chat template, then the answer and EOS, labels on the answer only), left-padded, with the
attention mask on the real tokens only. (open-unlearning masks every token equal to the pad id,
which for Llama-3 is also the template's EOS; that is its open issue #128, not reproduced here.)
Log-probabilities are computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sift.errors import SiftError
from sift.models import PromptFormat, example_ids, left_pad, model_device


@dataclass(frozen=True)
class AnswerScore:
    avg_loss: float  # mean NLL over the answer tokens, EOS included (Prob, Truth Ratio, LOSS, zlib)
    token_logprobs: tuple[float, ...]  # answer tokens, EOS excluded (Min-K%)
    token_z: tuple[float, ...]  # (log p - mu) / sigma over the vocabulary, EOS excluded (Min-K%++)
    tokens: int  # answer tokens including EOS


@torch.no_grad()
def score_answers(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int = 256,
    fmt: PromptFormat | None = None,
) -> list[AnswerScore]:
    """Scores of each (question, answer) pair, in order. Padding never changes a row's numbers
    beyond float rounding: every row is scored with its own tokens only. `fmt`: the template
    and answer span (sift.models.PromptFormat); training's by default."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [example_ids(tokenizer, q, a, None, fmt) for q, a in pairs]
    encoded = [(ids[:max_length], labels[:max_length]) for ids, labels in encoded]
    out: list[AnswerScore] = []
    model.eval()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        # Left padding puts every answer at the end, so the head runs on the answer positions only
        # (logits_to_keep; about a fifth of the compute for a 135M model); explicit position ids
        # keep each row's positions those of its unpadded sequence.
        keep_n = max(sum(1 for y in labels if y != -100) for _, labels in chunk) + 1
        ids, mask = left_pad([x for x, _ in chunk], pad)
        labels, _ = left_pad([y for _, y in chunk], -100)
        width = ids.shape[1]
        device = model_device(model)
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep_n).logits
        logits = logits[:, -keep_n:-1].float()  # a model that ignores logits_to_keep returns them all
        target = labels[:, width - keep_n + 1 :]
        logp_all = torch.log_softmax(logits, dim=-1)
        for i in range(len(chunk)):
            keep = (target[i] != -100).nonzero().squeeze(-1)
            lp_vocab = logp_all[i, keep]  # [T, V]
            tok = target[i, keep]
            lp = lp_vocab.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
            p = lp_vocab.exp()
            finite = torch.isfinite(lp_vocab)  # p = 0 where log p = -inf: those terms add nothing
            mu = torch.where(finite, p * lp_vocab, 0.0).sum(-1)
            var = (torch.where(finite, p * lp_vocab.square(), 0.0).sum(-1) - mu.square()).clamp(min=1e-6)
            z = (lp - mu) / var.sqrt()
            n = len(keep)
            if n < 2:
                q, a = pairs[start + i]
                raise SiftError(
                    f"the answer {a[:40]!r} to {q[:40]!r} has no tokens left within {max_length} tokens; shorten it or raise max_length"
                )
            out.append(
                AnswerScore(
                    avg_loss=float(-lp.mean()),
                    token_logprobs=tuple(lp[:-1].tolist()),
                    token_z=tuple(z[:-1].tolist()),
                    tokens=n,
                )
            )
    return out


def rouge_l_recall(answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L recall of each generated answer against its reference (the `rouge_score` package
    with the Porter stemmer, as open-unlearning's TOFU metrics)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [float(scorer.score(target=ref, prediction=ans)["rougeL"].recall) for ans, ref in zip(answers, references)]


def rouge_l_f1(answers: Sequence[str], references: Sequence[str], stemmer: bool = True) -> list[float]:
    """ROUGE-L F1 of each generated text against its reference: MUSE's VerbMem and KnowMem score
    (open-unlearning's rougeL_f1 uses the Porter stemmer; MUSE's own code does not: `stemmer`)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stemmer)
    return [float(scorer.score(target=ref, prediction=ans)["rougeL"].fmeasure) for ans, ref in zip(answers, references)]


@torch.no_grad()
def text_logprobs(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_length: int = 2048
) -> list[tuple[float, ...]]:
    """Each text's token log-probabilities as open-unlearning scores a pretraining row for MUSE's
    Min-K% (src/data/utils.py preprocess_pretraining_instance, metrics/utils.py tokenwise_logprobs
    @ d3d7cf9): the text with BOS, at most `max_length` tokens after it, every token after BOS
    scored but the last."""
    start_at = max(1, len(tokenizer("", add_special_tokens=True)["input_ids"]))
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"][: start_at + max_length] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[tuple[float, ...]] = []
    model.eval()
    for first in range(0, len(encoded), batch_size):
        chunk = encoded[first : first + batch_size]
        ids, mask = left_pad(chunk, pad)
        width = ids.shape[1]
        device = model_device(model)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1)
        for i, x in enumerate(chunk):
            n = len(x)
            if n < start_at + 2:
                raise SiftError(f"the text {tokenizer.decode(x)[:40]!r} is too short to score (under two tokens)")
            off = width - n
            # token j (off+j in the row) is predicted at position off+j-1; tokens start_at .. n-2
            pos = torch.arange(off + start_at - 1, off + n - 2, device=device)
            tok = ids[i, pos + 1]
            out.append(tuple(logp[i, pos].gather(-1, tok.unsqueeze(-1)).squeeze(-1).tolist()))
    return out
