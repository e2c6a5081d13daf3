"""The relearning attack: fine-tune an unlearned model for a few steps on part of the forget set
and measure how much of the rest comes back.

Unlearning that only hides knowledge (the weights still hold it, a small move brings it back) is
exposed by this attack (Fan et al., arXiv 2502.05374; Hu et al., "Jogging the memory of
unlearned LLMs", ICLR 2025): the attacker fine-tunes on a few forget samples with the plain
NLL and then asks about the others. A retrained model has never seen any of them, so what it
regains is what the attack itself teaches (plus what generalises from the relearned rows); the
gap between an unlearned model and the retrained reference under the same attack is the
knowledge the unlearning left behind. `sift forget` gives the reference's bytes, so it regains
exactly what the reference regains.

The attack here: the forget rows split by a seeded hash into a relearn part (`fraction`) and a
held-out part; a fresh LoRA adapter (rank 8 on every linear layer, seeded) on top of the model
under attack (a peft adapter is merged into its base first, so every model is attacked the same
way) is trained with AdamW on the relearn part for `epochs` passes; recall (exact, contains)
and the mean answer NLL on the held-out part are measured before and after.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sift.determinism import derive_seed, enable_determinism
from sift.errors import SiftError
from sift.evaluate import fact_recall
from sift.hashing import hash_order
from sift.loop import LoopSettings, run_loop
from sift.models import example_ids
from sift.serving.generate import greedy_answers


@dataclass
class RelearnSettings:
    fraction: float = 0.5  # of the forget rows the attacker relearns on
    # the LoRA fine-tuning's own learning rate, 5 passes: 2 passes at 1e-4 (4 AdamW steps on 5 rows)
    # moved no model measurably on the embedded default, not even the retrained reference's NLL
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 4
    rank: int = 8
    seed: int = 0
    max_new_tokens: int = 32

    def check(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise SiftError(f"relearn fraction must lie in (0, 1), got {self.fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.rank < 1:
            raise SiftError("relearn epochs, batch size and rank must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SiftError(f"relearn lr must be a positive number, got {self.lr}")


def split_forget(rows: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(relearn part, held-out part): the same split for every model attacked with one seed."""
    if len(rows) < 2:
        raise SiftError("the relearning attack needs at least 2 forget rows (some to relearn, some to ask)")
    ordered = hash_order(rows, key=lambda r: str(r["id"]), salt=f"relearn|{seed}|")
    n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    return sorted(ordered[:n], key=lambda r: r["id"]), sorted(ordered[n:], key=lambda r: r["id"])


def _answer_nll(model: Any, tok: Any, rows: list[dict[str, Any]]) -> float:
    from sift.evaluation.likelihood import score_answers

    scores = score_answers(model, tok, [(r["prompt"], r["completion"]) for r in rows])
    return sum(s.avg_loss for s in scores) / max(1, len(scores))


def _measure(model: Any, tok: Any, rows: list[dict[str, Any]], max_new_tokens: int) -> dict[str, float]:
    answers = greedy_answers(model, tok, [r["prompt"] for r in rows], max_new_tokens)
    recall = fact_recall(answers, rows)
    return {"exact": recall["exact"], "contains": recall["contains"], "answer_nll": round(_answer_nll(model, tok, rows), 6)}


def plain_model(model: Any) -> Any:
    """A copy of the model under attack as a plain transformers model (a peft adapter merged in)."""
    m = copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    return m.eval()


def relearn_attack(model: Any, tok: Any, forget: list[dict[str, Any]], settings: RelearnSettings | None = None) -> dict[str, Any]:
    """Attack a copy of `model` (left unchanged); returns the split, and recall and NLL on the
    held-out forget rows before and after relearning."""
    from peft import LoraConfig, get_peft_model

    s = settings or RelearnSettings()
    s.check()
    relearn, held = split_forget(forget, s.fraction, s.seed)
    enable_determinism()
    victim = plain_model(model)
    before = _measure(victim, tok, held, s.max_new_tokens)
    torch.manual_seed(derive_seed("relearn-lora", s.seed))  # the fresh adapter's A matrices
    attacked = get_peft_model(victim, LoraConfig(r=s.rank, lora_alpha=2 * s.rank, lora_dropout=0.0, target_modules="all-linear",
                                                 bias="none", task_type="CAUSAL_LM"))
    params = [p for p in attacked.parameters() if p.requires_grad]
    examples = [example_ids(tok, r["prompt"], r["completion"], None) for r in relearn]
    from sift.train import completion_loss

    attacked.train()
    result = run_loop(attacked.base_model.model, params, examples, tok.pad_token_id,
                      LoopSettings(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr), derive_seed("relearn-order", s.seed),
                      loss_fn=lambda m, b: completion_loss(m, *b))
    attacked.eval()
    after = _measure(attacked, tok, held, s.max_new_tokens)
    return {
        "settings": asdict(s),
        "relearn_rows": [r["id"] for r in relearn],
        "held_rows": [r["id"] for r in held],
        "steps": result.steps,
        "before": before,
        "after": after,
        "regained_contains": round(after["contains"] - before["contains"], 6),
    }
