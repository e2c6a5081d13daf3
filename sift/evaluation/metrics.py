"""The unlearning metrics, as open-unlearning (locuslab/open-unlearning @ d3d7cf9) defines them,
so that sift's numbers read like published TOFU numbers. Pure functions of per-row scores; the
model work is in sift.evaluation.likelihood. docs/notes/open-unlearning-metrics.md holds the
source reading these follow.

Names, directions and formulas are in METRICS: `sift eval --help` and every report print them,
so nobody has to guess which variant a number is (users of open-unlearning ask for exactly this).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TINY = 1e-10  # open-unlearning's guard in every ratio


@dataclass(frozen=True)
class Metric:
    name: str
    better: str  # "higher" | "lower" | "closer to the reference" | "closer to 0"
    formula: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("forget_Q_A_Prob", "lower", "mean over forget rows of exp(-mean answer-token NLL), EOS included"),
        Metric(
            "forget_Q_A_ROUGE",
            "lower",
            "mean ROUGE-L recall (rouge_score, stemmer) of the greedy answer against the answer",
        ),
        Metric(
            "forget_truth_ratio",
            "closer to the reference",
            "mean min(R, 1/R), R = P(perturbed)/P(paraphrased), length-normalised, perturbed = geometric mean over options",
        ),
        Metric(
            "forget_exact", "lower", "share of forget questions whose greedy answer is the trained answer (normalised)"
        ),
        Metric("forget_contains", "lower", "share of forget questions whose greedy answer contains the fact's value"),
        Metric(
            "forget_quality",
            "higher",
            "KS-test p-value (scipy ks_2samp, two-sided) between the forget rows' R under the model and under the retain reference",
        ),
        Metric("retain_Q_A_Prob", "higher", "as forget_Q_A_Prob, on retain rows"),
        Metric("retain_Q_A_ROUGE", "higher", "as forget_Q_A_ROUGE, on retain rows"),
        Metric("retain_Truth_Ratio", "higher", "mean max(0, 1 - R) on retain rows"),
        Metric("retain_exact", "higher", "as forget_exact, on retain rows"),
        Metric("retain_contains", "higher", "as forget_contains, on retain rows"),
        Metric(
            "wf_Q_A_Prob_normalised",
            "higher",
            "general questions: mean c / (c + sum of w_j), c and w_j length-normalised probabilities of the true and wrong answers",
        ),
        Metric("wf_Q_A_ROUGE", "higher", "general questions: ROUGE-L recall of the greedy answer"),
        Metric("wf_Truth_Ratio", "higher", "general questions: mean max(0, 1 - R), R = P(wrong)/P(true answer)"),
        Metric(
            "wf_correct",
            "higher",
            "share of general questions answered correctly (an accepted answer in the greedy answer)",
        ),
        Metric(
            "model_utility",
            "higher",
            "scipy hmean of retain_Q_A_Prob, retain_Q_A_ROUGE, retain_Truth_Ratio, wf_Q_A_Prob_normalised, wf_Q_A_ROUGE, wf_Truth_Ratio",
        ),
        Metric(
            "mia_loss",
            "closer to the reference",
            "ROC AUC (sklearn), forget = 0 vs holdout = 1, score = mean answer NLL (EOS included)",
        ),
        Metric(
            "mia_zlib",
            "closer to the reference",
            "ROC AUC, score = mean answer NLL / zlib-compressed byte length of the answer",
        ),
        Metric(
            "mia_min_k",
            "closer to the reference",
            "ROC AUC, score = -mean of the 40 % lowest answer-token log-probs (EOS excluded)",
        ),
        Metric(
            "mia_min_k_plus_plus",
            "closer to the reference",
            "ROC AUC, score = -mean of the 40 % lowest (log p - mu) / sigma over the vocabulary (EOS excluded)",
        ),
        Metric(
            "privleak",
            "closer to 0",
            "((1 - AUC) - (1 - AUC_ref)) / (1 - AUC_ref) * 100 on mia_min_k; AUC_ref of the retain reference",
        ),
        Metric(
            "relearn_contains",
            "closer to the reference",
            "relearning attack: share of the held-out forget questions whose greedy answer contains the fact after a fresh LoRA is fine-tuned on the other forget rows (sift.evaluation.relearn)",
        ),
        Metric(
            "relearn_regained",
            "closer to the reference",
            "relearning attack: relearn_contains minus the same share before the attack",
        ),
        Metric(
            "relearn_nll",
            "closer to the reference",
            "relearning attack: mean answer NLL of the held-out forget questions after it (lower: more came back); before it in results.json",
        ),
        Metric("seconds", "lower", "wall time to produce the model (training or unlearning), seconds"),
        Metric(
            "flops",
            "lower",
            "training FLOPs estimate: 6 N per token trained + 2 N per token only scored, N = model parameters",
        ),
    )
}


def prob(avg_loss: float) -> float:
    """Length-normalised answer probability, P(a|q)^(1/|a|)."""
    return math.exp(-avg_loss)


def truth_ratio(loss_correct: float, losses_wrong: Sequence[float]) -> float:
    """R = P_wrong / P_correct with P = exp(-mean token NLL); the wrong answers are pooled as the
    mean of their log-losses (a geometric mean of their probabilities), as open-unlearning does."""
    return math.exp(-float(np.mean(losses_wrong))) / (math.exp(-loss_correct) + TINY)


def closer_to_1(ratios: Sequence[float]) -> float:
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1.0 / (r + TINY))))


def true_better(ratios: Sequence[float]) -> float:
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1.0 - r)))


def prob_normalised(loss_correct: float, losses_wrong: Sequence[float]) -> float:
    c = prob(loss_correct)
    return c / (c + sum(prob(x) for x in losses_wrong) + TINY)


def forget_quality(model_ratios: Sequence[float], reference_ratios: Sequence[float]) -> dict[str, float | int]:
    """The KS two-sample test's p-value between two sets of forget-row truth ratios."""
    from scipy.stats import ks_2samp

    if len(model_ratios) == 0 or len(reference_ratios) == 0:
        raise ValueError("forget_quality needs truth ratios on both sides")
    if not (np.all(np.isfinite(model_ratios)) and np.all(np.isfinite(reference_ratios))):
        raise ValueError("forget_quality got a non-finite truth ratio")
    p = float(
        ks_2samp(np.asarray(model_ratios, dtype=np.float64), np.asarray(reference_ratios, dtype=np.float64)).pvalue
    )
    return {
        "p": p,
        "log10_p": math.log10(p) if p > 0 else -324.0,
        "n": len(model_ratios),
        "n_ref": len(reference_ratios),
    }


def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any input is 0 (a collapsed model has no utility)."""
    from scipy.stats import hmean

    v = np.asarray(values, dtype=np.float64)
    if np.any(v <= 0):
        return 0.0
    return float(hmean(v))


# -- membership inference ----------------------------------------------------------------------
# Every score is loss-like: higher means "looks less like a member".


def zlib_score(avg_loss: float, text: str) -> float:
    return avg_loss / len(zlib.compress(text.encode("utf-8")))


def min_k_score(values: Sequence[float], k: float = 0.4) -> float:
    """-mean of the k-fraction smallest values (token log-probs for Min-K%, z-scores for Min-K%++)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = max(1, int(len(v) * k))
    return float(-np.mean(v[:n]))


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC with forget rows labelled 0 and held-out rows 1, on loss-like scores: 1 means the
    forget rows look memorised, 0.5 indistinguishable from people never trained on."""
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return float(roc_auc_score(labels, list(forget_scores) + list(holdout_scores)))


def privleak(auc: float, auc_reference: float) -> float:
    """MUSE's relative leak, in percent: 0 for a model that leaks as the reference does,
    near -100 for one that remembers every forget row."""
    score, ref = 1.0 - auc, 1.0 - auc_reference
    return (score - ref) / (ref + TINY) * 100.0


def metrics_help() -> str:
    """One line per registered metric (direction; formula): `sift eval --help` and the docs."""
    return "\n".join(f"  {m.name}: {m.better} is better; {m.formula}" for m in METRICS.values())


def metrics_markdown() -> str:
    """The metric table of docs/evaluation.md, from the registry (tests/test_docs.py checks it)."""
    rows = [f"| `{m.name}` | {m.better} | {m.formula.replace('|', '/')} |" for m in METRICS.values()]
    return "\n".join(["| metric | better | definition |", "|---|---|---|", *rows])


# The columns each table shows, by registered name (checked below, so a renamed metric cannot
# leave a table pointing at nothing).
EVAL_TABLE = [
    "forget_quality",
    "model_utility",
    "forget_truth_ratio",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_exact",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "wf_correct",
    "mia_min_k",
    "privleak",
]  # sift eval
COMPARE_TABLE = [
    "forget_quality",
    "model_utility",
    "forget_truth_ratio",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_exact",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_exact",
    "wf_Q_A_Prob_normalised",
    "wf_correct",
    "mia_min_k",
    "privleak",
    "relearn_contains",
    "relearn_regained",
    "relearn_nll",
    "seconds",
    "flops",
]  # sift compare's report
_unknown = sorted(set(EVAL_TABLE + COMPARE_TABLE) - set(METRICS))
if _unknown:  # a renamed metric must not leave a table pointing at nothing
    raise RuntimeError(f"tables name unregistered metrics: {_unknown}")
