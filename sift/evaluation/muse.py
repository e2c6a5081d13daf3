"""`sift eval --benchmark muse-news|muse-books`: MUSE's metrics as open-unlearning computes them
(configs/eval/muse_metrics @ d3d7cf9), so the numbers read like its published MUSE table.

- forget_verbmem_ROUGE: greedy continuation of each verbmem prompt (the prompt as is, with BOS;
  128 new tokens), ROUGE-L F1 against the true continuation `gt`.
- forget_knowmem_ROUGE, retain_knowmem_ROUGE: each question posed after the ten in-context
  examples of its _icl split in "Question: {q}\\nAnswer: {a}\\n\\n" form, greedy (32 new tokens),
  cut at the first blank line or "Question", ROUGE-L F1 against the answer.
- mia_min_k and privleak: Min-K% (k = 0.4) on privleak/forget (label 0) against
  privleak/holdout (label 1), AUC by sklearn; privleak = ((1 - AUC) - (1 - AUC_ref)) / (1 -
  AUC_ref) * 100, AUC_ref the retrained model's (a --reference model or its saved result), else
  0.5 as open-unlearning's default (MUSE's own code hard-codes its retrained models' AUCs,
  sift.benchmarks.muse.MUSE_RETRAIN_AUC, in the opposite orientation: 1 - those). Negative:
  the forget texts still look like members (under-unlearned); positive: over-unlearned.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from sift.benchmarks.muse import EvalSets
from sift.errors import SiftError
from sift.evaluation import metrics as M
from sift.evaluation.likelihood import rouge_l_f1, text_logprobs
from sift.evaluation.targets import Target
from sift.models import PromptFormat
from sift.serving.generate import greedy_answers

STOP = ("\n\n", "\nQuestion", "Question:")  # open-unlearning's knowmem stopwords


@dataclass
class MuseSettings:
    batch_size: int = 8
    verbmem_new_tokens: int = 128
    knowmem_new_tokens: int = 32
    min_k: float = 0.4
    max_length: int = 2048  # tokens of a privleak text scored
    stemmer: bool = True  # open-unlearning's ROUGE; MUSE's own code uses none

    def check(self) -> None:
        if min(self.batch_size, self.verbmem_new_tokens, self.knowmem_new_tokens, self.max_length) < 1:
            raise SiftError("batch size, new tokens and max length must be at least 1")
        if not 0 < self.min_k <= 1:
            raise SiftError(f"--min-k must lie in (0, 1], got {self.min_k}")


def cut_at_stop(text: str) -> str:
    """A knowmem answer up to the first stop string, stripped (open-unlearning's post-processing)."""
    for s in STOP:
        text = text.split(s, 1)[0]
    return text.strip()


def _generate(target: Target, prompts: list[str], new_tokens: int, s: MuseSettings, **kw: Any) -> list[str]:
    out = [""] * len(prompts)
    for model, tok, idx in target.groups(prompts):
        for i, a in zip(idx, greedy_answers(model, tok, [prompts[i] for i in idx], new_tokens, s.batch_size, **kw)):
            out[i] = a
    return out


def _min_k(target: Target, texts: list[str], s: MuseSettings) -> list[float]:
    scores = [0.0] * len(texts)
    for model, tok, idx in target.groups(texts):
        for i, lp in zip(idx, text_logprobs(model, tok, [texts[i] for i in idx], s.batch_size, s.max_length)):
            scores[i] = M.min_k_score(lp, s.min_k)
    return scores


def evaluate_muse(
    target: Target, sets: EvalSets, settings: MuseSettings | None = None, reference: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every MUSE metric for `target`; `reference`: an earlier result of this function for the
    retrained model (its mia_min_k is AUC_ref), or None for open-unlearning's default 0.5."""
    s = settings or MuseSettings()
    s.check()
    started = time.perf_counter()
    raw, tofu = PromptFormat("raw"), PromptFormat("tofu")
    verb = _generate(target, [r["prompt"] for r in sets.verbmem], s.verbmem_new_tokens, s, fmt=raw)
    per: dict[str, list[float]] = {"verbmem": rouge_l_f1(verb, [r["gt"] for r in sets.verbmem], s.stemmer)}
    answers: dict[str, list[str]] = {"verbmem": verb}
    for name, qa, icl in (
        ("forget_knowmem", sets.forget_qa, sets.forget_icl),
        ("retain_knowmem", sets.retain_qa, sets.retain_icl),
    ):
        shots = tuple((r["prompt"], r["completion"]) for r in icl)
        got = [
            cut_at_stop(a)
            for a in _generate(target, [r["prompt"] for r in qa], s.knowmem_new_tokens, s, fmt=tofu, shots=shots)
        ]
        per[name] = rouge_l_f1(got, [r["completion"] for r in qa], s.stemmer)
        answers[name] = got
    metrics = M.compute_metrics("muse", M.MetricInputs(muse=per))
    forget_scores = _min_k(target, [r["text"] for r in sets.privleak_forget], s)
    holdout_scores = _min_k(target, [r["text"] for r in sets.privleak_holdout], s)
    metrics["mia_min_k"] = M.mia_auc(forget_scores, holdout_scores)
    if reference is not None:
        if reference.get("settings", {}).get("min_k") != s.min_k:
            raise SiftError("the reference was scored with another Min-K k: score both the same way")
        auc_ref, ref_label = float(reference["metrics"]["mia_min_k"]), reference.get("model")
    else:
        auc_ref, ref_label = 0.5, "none: open-unlearning's default AUC_ref 0.5"
    metrics["privleak"] = M.privleak(metrics["mia_min_k"], auc_ref)
    return {
        "model": target.label,
        "kind": target.kind,
        "benchmark": None,  # filled by the caller (name, source)
        "n": {
            "verbmem": len(sets.verbmem),
            "forget_qa": len(sets.forget_qa),
            "retain_qa": len(sets.retain_qa),
            "privleak_forget": len(sets.privleak_forget),
            "privleak_holdout": len(sets.privleak_holdout),
        },
        "metrics": metrics,
        "reference": ref_label,
        "reference_auc": auc_ref,
        "settings": asdict(s),
        "eval_seconds": round(time.perf_counter() - started, 3),
        "per_row": {
            **{f"{k}_rougeL_f1": dict(zip(_ids(sets, k), v)) for k, v in per.items()},
            **{f"{k}_answer": dict(zip(_ids(sets, k), v)) for k, v in answers.items()},
            "mia_min_k_forget": dict(zip([r["id"] for r in sets.privleak_forget], forget_scores)),
            "mia_min_k_holdout": dict(zip([r["id"] for r in sets.privleak_holdout], holdout_scores)),
        },
    }


def _ids(sets: EvalSets, key: str) -> list[str]:
    rows = {"verbmem": sets.verbmem, "forget_knowmem": sets.forget_qa, "retain_knowmem": sets.retain_qa}[key]
    return [r["id"] for r in rows]
