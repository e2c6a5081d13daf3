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
from sift.evaluation.recall import fact_recall
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


def split_forget(
    rows: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
    return {
        "exact": recall["exact"],
        "contains": recall["contains"],
        "answer_nll": round(_answer_nll(model, tok, rows), 6),
    }


def plain_model(model: Any) -> Any:
    """A copy of the model under attack as a plain transformers model (a peft adapter merged in)."""
    m = copy.deepcopy(model)
    if hasattr(m, "merge_and_unload"):
        m = m.merge_and_unload()
    return m.eval()


def relearn_attack(
    model: Any, tok: Any, forget: list[dict[str, Any]], settings: RelearnSettings | None = None
) -> dict[str, Any]:
    """Attack a copy of `model` (left unchanged); returns the split, and recall and NLL on the
    held-out forget rows before and after relearning."""
    s = settings or RelearnSettings()
    s.check()
    relearn, held = split_forget(forget, s.fraction, s.seed)
    before, after, steps = _attack(model, tok, relearn, held, s)
    return _record(s, relearn, held, steps, before, after)


def relearn_attack_routed(
    server: Any, forget: list[dict[str, Any]], settings: RelearnSettings | None = None
) -> dict[str, Any]:
    """The attack on a routed workspace (a sift.serving.answer.WorkspaceServer): each held-out
    question goes to the model that serves it (its shard's adapter, or the merged model when no
    shard claims it), and the attacker fine-tunes that model on the whole relearn half, as one
    who can reach the serving weights would. Recall and NLL are pooled over the held-out rows,
    so the record reads as `relearn_attack`'s; `served_by` lists each attacked model."""
    s = settings or RelearnSettings()
    s.check()
    relearn, held = split_forget(forget, s.fraction, s.seed)
    pooled: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    served_by, steps = [], 0
    for model, tok, path, shard, idx in server.models_for([r["prompt"] for r in held]):
        rows = [held[i] for i in idx]
        before, after, n = _attack(model, tok, relearn, rows, s)
        steps += n
        for key, got in (("before", before), ("after", after)):
            for metric, value in got.items():
                pooled[key][metric] = pooled[key].get(metric, 0.0) + value * len(rows)
        served_by.append({"path": path, "shard": shard, "held_rows": [r["id"] for r in rows]})
    for key in pooled:
        pooled[key] = {m: round(v / len(held), 6) for m, v in pooled[key].items()}
    return {**_record(s, relearn, held, steps, pooled["before"], pooled["after"]), "served_by": served_by}


def _attack(
    model: Any, tok: Any, relearn: list[dict[str, Any]], held: list[dict[str, Any]], s: RelearnSettings
) -> tuple[dict[str, float], dict[str, float], int]:
    """(before, after, steps): a fresh seeded LoRA on a copy of `model`, trained on `relearn`,
    `held` measured before and after."""
    from peft import LoraConfig, get_peft_model

    from sift.train.lora import completion_loss

    enable_determinism()
    victim = plain_model(model)
    before = _measure(victim, tok, held, s.max_new_tokens)
    torch.manual_seed(derive_seed("relearn-lora", s.seed))  # the fresh adapter's A matrices
    attacked = get_peft_model(
        victim,
        LoraConfig(
            r=s.rank,
            lora_alpha=2 * s.rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in attacked.parameters() if p.requires_grad]
    examples = [example_ids(tok, r["prompt"], r["completion"], None) for r in relearn]
    attacked.train()
    result = run_loop(
        attacked.base_model.model,
        params,
        examples,
        tok.pad_token_id,
        LoopSettings(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr),
        derive_seed("relearn-order", s.seed),
        loss_fn=lambda m, b: completion_loss(m, *b),
    )
    attacked.eval()
    return before, _measure(attacked, tok, held, s.max_new_tokens), result.steps


def _record(
    s: RelearnSettings,
    relearn: list[dict[str, Any]],
    held: list[dict[str, Any]],
    steps: int,
    before: dict[str, float],
    after: dict[str, float],
) -> dict[str, Any]:
    return {
        "settings": asdict(s),
        "relearn_rows": [r["id"] for r in relearn],
        "held_rows": [r["id"] for r in held],
        "steps": steps,
        "before": before,
        "after": after,
        "regained_contains": round(after["contains"] - before["contains"], 6),
    }
