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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TINY = 1e-10  # open-unlearning's guard in every ratio


SOURCES = ("model", "reference", "relearn", "cost", "muse")


@dataclass
class SetScores:
    """One row set's scores under one model, row by row (rows sorted by id): the answer's mean
    token NLL and its token log-probs and z-scores, the paraphrased and perturbed answers' NLLs
    (the sets that carry them), the greedy answer and its ROUGE-L recall."""

    rows: list[dict[str, Any]]
    answer_loss: list[float]
    token_logprobs: list[Sequence[float]]
    token_z: list[Sequence[float]]
    para_loss: list[float] = field(default_factory=list)
    pert_losses: list[list[float]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    rouge: list[float] = field(default_factory=list)


@dataclass
class ReferenceScores:
    """What the retain reference gives: the KS test on the forget rows' truth ratios, and its
    Min-K% AUC on the same forget and held-out rows."""

    forget_quality: dict[str, float | int]
    auc_min_k: float


@dataclass
class MetricInputs:
    """Everything a metric computes from; each source fills its part. `values`: the metrics
    computed so far (model_utility reads them)."""

    sets: dict[str, SetScores] = field(default_factory=dict)  # forget, retain, wf, ra, holdout
    min_k: float = 0.4
    values: dict[str, float] = field(default_factory=dict)
    reference: ReferenceScores | None = None
    relearn: dict[str, Any] | None = None  # sift.evaluation.relearn's record
    cost: dict[str, float] = field(default_factory=dict)
    muse: dict[str, list[float]] = field(default_factory=dict)  # MUSE's per-row ROUGE-L F1 lists


@dataclass(frozen=True)
class Metric:
    """A registered metric: `compute(inputs)` gives its value, or None where it does not apply
    (the wf_* metrics without general questions). `source` says what it needs: "model" one
    model's scores (sift eval), "reference" the retain reference as well, "relearn" the
    relearning attack's record (sift compare), "cost" the run's cost record, "muse" MUSE's
    generations (sift eval --benchmark muse-news|muse-books)."""

    name: str
    better: str  # "higher" | "lower" | "closer to the reference" | "closer to 0"
    formula: str
    compute: Callable[[MetricInputs], float | None]
    source: str = "model"


def compute_metrics(source: str, inputs: MetricInputs) -> dict[str, float]:
    """Every registered metric of `source`, in registry order (None results left out); each
    sees the ones computed before it in `inputs.values`."""
    if source not in SOURCES:
        raise ValueError(f"unknown metric source {source!r}: use one of {', '.join(SOURCES)}")
    out: dict[str, float] = {}
    for m in METRICS.values():
        if m.source == source:
            v = m.compute(inputs)
            if v is not None:
                out[m.name] = v
                inputs.values[m.name] = v
    return out


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


def prob_mean(ratios: Sequence[float]) -> float:
    """open-unlearning's "prob_mean" aggregator, on R = P_wrong / P_correct: the mean of
    P_correct / (P_correct + P_wrong) = 1 / (1 + R) (its code computes that per sample directly)."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(1.0 / (1.0 + r)))


# open-unlearning's truth-ratio aggregators (src/evals/metrics/memorization.py @ d3d7cf9), by its names
TRUTH_RATIO_AGGREGATORS: dict[str, Callable[[Sequence[float]], float]] = {
    "closer_to_1_better": closer_to_1,
    "true_better": true_better,
    "prob_mean": prob_mean,
}


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


def ks_pvalues(n: int) -> list[float]:
    """Every p-value forget_quality can take with n forget rows on each side (the model's and the
    reference's truth ratios on the same rows): the statistic D is k/n for k = 0..n, so there are
    at most n + 1 values, from 1 down; k = 0 and 1 both give 1. Computed by scipy itself, on two
    samples whose empirical distributions differ by exactly k/n."""
    import warnings

    from scipy.stats import ks_2samp

    base = np.arange(n, dtype=np.float64)
    with warnings.catch_warnings():  # scipy falls back to the asymptotic form for large n, as forget_quality does
        warnings.simplefilter("ignore", RuntimeWarning)
        return [float(ks_2samp(base, base + k - 0.5).pvalue) if k else 1.0 for k in range(n + 1)]


def ks_resolution(n: int) -> str:
    """One line for a report: how finely forget_quality can tell a model from its reference."""
    distinct: list[float] = []
    for p in sorted(ks_pvalues(n), reverse=True):
        if not distinct or not math.isclose(p, distinct[-1], rel_tol=1e-4, abs_tol=0.0):
            distinct.append(p)
    shown = ", ".join(f"{p:.3g}" for p in distinct[:6])
    return (
        f"forget_quality is a KS test on n = {n} forget rows a side: it can take {len(distinct)} distinct p-values "
        f"({shown}{', ...' if len(distinct) > 6 else ''}; the smallest {distinct[-1]:.3g}); one row's truth ratio "
        "crossing the other side's moves it one step along that list"
    )


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


# -- what each metric computes from the scores ---------------------------------------------------


def truth_ratios(sc: SetScores, wrong_against_answer: bool = False) -> list[float]:
    """R per row: perturbed against paraphrased (forget, retain), or wrong against the true answer
    (general questions, which have no paraphrase)."""
    correct = sc.answer_loss if wrong_against_answer else sc.para_loss
    return [truth_ratio(c, w) for c, w in zip(correct, sc.pert_losses)]


def answer_probs(sc: SetScores) -> list[float]:
    return [prob(x) for x in sc.answer_loss]


# each membership attack's loss-like score per row of a set (higher: looks less like a member)
MIA_ATTACKS: dict[str, Callable[[SetScores, float], list[float]]] = {
    "loss": lambda sc, k: list(sc.answer_loss),
    "zlib": lambda sc, k: [zlib_score(x, r["completion"]) for x, r in zip(sc.answer_loss, sc.rows)],
    "min_k": lambda sc, k: [min_k_score(t, k) for t in sc.token_logprobs],
    "min_k_plus_plus": lambda sc, k: [min_k_score(t, k) for t in sc.token_z],
}


def mia_scores(sc: SetScores, min_k: float) -> dict[str, list[float]]:
    """The four attacks' loss-like scores per row (higher: looks less like a member)."""
    return {attack: score(sc, min_k) for attack, score in MIA_ATTACKS.items()}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _recall(name: str, key: str) -> Callable[[MetricInputs], float]:
    from sift.evaluation.recall import fact_recall

    return lambda i: fact_recall(i.sets[name].answers, i.sets[name].rows)[key]


def _wf(fn: Callable[[SetScores], float], name: str = "wf") -> Callable[[MetricInputs], float | None]:
    """A general-knowledge metric (wf: world facts, ra: real authors): left out when that set
    was not scored."""
    return lambda i: fn(i.sets[name]) if i.sets.get(name) is not None and i.sets[name].rows else None


def _general_metrics(name: str, label: str) -> tuple[Metric, ...]:
    """The three likelihood and ROUGE metrics of a general-knowledge set (open-unlearning's ra_*
    and wf_*): the true answer stands in for the paraphrase, and the options are normalised."""
    return (
        Metric(
            f"{name}_Q_A_Prob_normalised",
            "higher",
            f"{label}: mean c / (c + sum of w_j), c and w_j length-normalised probabilities of the true and wrong answers",
            _wf(lambda sc: _mean([prob_normalised(c, w) for c, w in zip(sc.answer_loss, sc.pert_losses)]), name),
        ),
        Metric(
            f"{name}_Q_A_ROUGE",
            "higher",
            f"{label}: ROUGE-L recall of the greedy answer",
            _wf(lambda sc: _mean(sc.rouge), name),
        ),
        Metric(
            f"{name}_Truth_Ratio",
            "higher",
            f"{label}: aggregator true_better, mean max(0, 1 - R), R = P(wrong)/P(true answer)",
            _wf(lambda sc: true_better(truth_ratios(sc, wrong_against_answer=True)), name),
        ),
    )


def _muse(key: str) -> Callable[[MetricInputs], float | None]:
    return lambda i: _mean(i.muse[key]) if i.muse.get(key) else None


def _general_correct(sc: SetScores) -> float:
    from sift.evaluation.recall import general_recall

    return general_recall(sc.answers, sc.rows)["correct"]


def _utility(i: MetricInputs) -> float:
    names = ["retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"]
    general = [f"{s}_{m}" for s in ("ra", "wf") for m in ("Q_A_Prob_normalised", "Q_A_ROUGE", "Truth_Ratio")]
    names += [n for n in general if n in i.values]
    return model_utility([i.values[n] for n in names])  # the retain part's, and the general sets scored


def _mia(attack: str) -> Callable[[MetricInputs], float]:
    def auc(i: MetricInputs) -> float:
        score = MIA_ATTACKS[attack]  # this attack's scores only, not all four for each metric
        return mia_auc(score(i.sets["forget"], i.min_k), score(i.sets["holdout"], i.min_k))

    return auc


def _ref(fn: Callable[[ReferenceScores, dict[str, float]], float]) -> Callable[[MetricInputs], float | None]:
    return lambda i: None if i.reference is None else fn(i.reference, i.values)


def _relearn(fn: Callable[[dict[str, Any]], float]) -> Callable[[MetricInputs], float | None]:
    return lambda i: None if i.relearn is None else fn(i.relearn)


def _cost(key: str) -> Callable[[MetricInputs], float | None]:
    return lambda i: i.cost.get(key)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "forget_Q_A_Prob",
            "lower",
            "mean over forget rows of exp(-mean answer-token NLL), EOS included",
            lambda i: _mean(answer_probs(i.sets["forget"])),
        ),
        Metric(
            "forget_Q_A_ROUGE",
            "lower",
            "mean ROUGE-L recall (rouge_score, stemmer) of the greedy answer against the answer",
            lambda i: _mean(i.sets["forget"].rouge),
        ),
        Metric(
            "forget_truth_ratio",
            "closer to the reference",
            "aggregator closer_to_1_better: mean min(R, 1/R), R = P(perturbed)/P(paraphrased), length-normalised, perturbed = geometric mean over options (forget_quality's KS test reads the per-row R)",
            lambda i: closer_to_1(truth_ratios(i.sets["forget"])),
        ),
        Metric(
            "forget_truth_ratio_true_better",
            "closer to the reference",
            "aggregator true_better: mean max(0, 1 - R), R as forget_truth_ratio",
            lambda i: true_better(truth_ratios(i.sets["forget"])),
        ),
        Metric(
            "forget_truth_ratio_prob_mean",
            "closer to the reference",
            "aggregator prob_mean: mean P(paraphrased) / (P(paraphrased) + P(perturbed)) = mean 1 / (1 + R)",
            lambda i: prob_mean(truth_ratios(i.sets["forget"])),
        ),
        Metric(
            "forget_exact",
            "lower",
            "share of forget questions whose greedy answer is the trained answer (normalised)",
            _recall("forget", "exact"),
        ),
        Metric(
            "forget_contains",
            "lower",
            "share of forget questions whose greedy answer contains the fact's value",
            _recall("forget", "contains"),
        ),
        Metric(
            "forget_quality",
            "higher",
            "KS-test p-value (scipy ks_2samp, two-sided) between the forget rows' R under the model and under the retain reference",
            _ref(lambda ref, v: float(ref.forget_quality["p"])),
            "reference",
        ),
        Metric(
            "retain_Q_A_Prob",
            "higher",
            "as forget_Q_A_Prob, on retain rows",
            lambda i: _mean(answer_probs(i.sets["retain"])),
        ),
        Metric(
            "retain_Q_A_ROUGE", "higher", "as forget_Q_A_ROUGE, on retain rows", lambda i: _mean(i.sets["retain"].rouge)
        ),
        Metric(
            "retain_Truth_Ratio",
            "higher",
            "aggregator true_better: mean max(0, 1 - R) on retain rows",
            lambda i: true_better(truth_ratios(i.sets["retain"])),
        ),
        Metric(
            "retain_Truth_Ratio_prob_mean",
            "higher",
            "aggregator prob_mean: mean 1 / (1 + R) on retain rows",
            lambda i: prob_mean(truth_ratios(i.sets["retain"])),
        ),
        Metric("retain_exact", "higher", "as forget_exact, on retain rows", _recall("retain", "exact")),
        Metric("retain_contains", "higher", "as forget_contains, on retain rows", _recall("retain", "contains")),
        *_general_metrics("ra", "real authors (TOFU's real_authors_perturbed)"),
        *_general_metrics("wf", "general questions"),
        Metric(
            "wf_correct",
            "higher",
            "share of general questions answered correctly (an accepted answer in the greedy answer)",
            _wf(_general_correct),
        ),
        Metric(
            "model_utility",
            "higher",
            "scipy hmean of retain_Q_A_Prob, retain_Q_A_ROUGE, retain_Truth_Ratio and, for each general set scored (ra, wf), its Q_A_Prob_normalised, Q_A_ROUGE, Truth_Ratio: 9 values on TOFU, 6 on the builtin data (no real-authors set)",
            _utility,
        ),
        Metric(
            "mia_loss",
            "closer to the reference",
            "ROC AUC (sklearn), forget = 0 vs holdout = 1, score = mean answer NLL (EOS included)",
            _mia("loss"),
        ),
        Metric(
            "mia_zlib",
            "closer to the reference",
            "ROC AUC, score = mean answer NLL / zlib-compressed byte length of the answer",
            _mia("zlib"),
        ),
        Metric(
            "mia_min_k",
            "closer to the reference",
            "ROC AUC, score = -mean of the 40 % lowest answer-token log-probs (EOS excluded)",
            _mia("min_k"),
        ),
        Metric(
            "mia_min_k_plus_plus",
            "closer to the reference",
            "ROC AUC, score = -mean of the 40 % lowest (log p - mu) / sigma over the vocabulary (EOS excluded)",
            _mia("min_k_plus_plus"),
        ),
        Metric(
            "privleak",
            "closer to 0",
            "((1 - AUC) - (1 - AUC_ref)) / (1 - AUC_ref) * 100 on mia_min_k; AUC_ref of the retain reference",
            _ref(lambda ref, v: privleak(v["mia_min_k"], ref.auc_min_k)),
            "reference",
        ),
        Metric(
            "forget_verbmem_ROUGE",
            "lower",
            "MUSE VerbMem: mean ROUGE-L F1 (rouge_score, stemmer) of the greedy continuation (128 new tokens) of each verbmem prompt against its true continuation gt",
            _muse("verbmem"),
            "muse",
        ),
        Metric(
            "forget_knowmem_ROUGE",
            "lower",
            "MUSE KnowMem on forget_qa: mean ROUGE-L F1 of the greedy answer (32 new tokens, cut at a blank line or 'Question') posed after the forget_qa_icl examples, against the answer",
            _muse("forget_knowmem"),
            "muse",
        ),
        Metric(
            "retain_knowmem_ROUGE",
            "higher",
            "MUSE KnowMem on retain_qa (utility preservation): as forget_knowmem_ROUGE, with the retain_qa_icl examples",
            _muse("retain_knowmem"),
            "muse",
        ),
        Metric(
            "relearn_contains",
            "closer to the reference",
            "relearning attack: share of the held-out forget questions whose greedy answer contains the fact after a fresh LoRA is fine-tuned on the other forget rows (sift.evaluation.relearn)",
            _relearn(lambda r: r["after"]["contains"]),
            "relearn",
        ),
        Metric(
            "relearn_regained",
            "closer to the reference",
            "relearning attack: relearn_contains minus the same share before the attack",
            _relearn(lambda r: r["regained_contains"]),
            "relearn",
        ),
        Metric(
            "relearn_nll",
            "closer to the reference",
            "relearning attack: mean answer NLL of the held-out forget questions after it (lower: more came back); before it in results.json",
            _relearn(lambda r: r["after"]["answer_nll"]),
            "relearn",
        ),
        Metric(
            "seconds",
            "lower",
            "wall time to produce the model (training or unlearning), seconds",
            _cost("seconds"),
            "cost",
        ),
        Metric(
            "flops",
            "lower",
            "training FLOPs estimate: 6 N per token trained + 2 N per token only scored, N = model parameters",
            _cost("flops"),
            "cost",
        ),
    )
}


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
MUSE_TABLE = [
    "forget_verbmem_ROUGE",
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "mia_min_k",
    "privleak",
]  # sift eval --benchmark muse-news|muse-books, in open-unlearning's column order
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
_unknown = sorted(set(EVAL_TABLE + COMPARE_TABLE + MUSE_TABLE) - set(METRICS))
if _unknown:  # a renamed metric must not leave a table pointing at nothing
    raise RuntimeError(f"tables name unregistered metrics: {_unknown}")
