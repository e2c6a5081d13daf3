"""Forgetting quality F of the NeurIPS 2023 Machine Unlearning Challenge, reimplemented in numpy.

Reference: Triantafillou et al., "Are we making progress in unlearning? Findings from the first
NeurIPS unlearning competition" (arXiv 2406.09073), and the organisers' scoring code
(github.com/google-deepmind/unlearning_evaluation, ``metric.py`` and ``main.py``). This module is an
independent implementation written from that description; it follows the published code wherever
the code is more specific than the write-up (listed below).

Definition
----------
Input: for each forget example s, a scalar statistic (the challenge used the logit-scaled
confidence of the true class) measured under N unlearned models, ``unlearned[s]``, and under N
models retrained without the forget set, ``reference[s]``. Arrays have shape [examples, N].

Per-example epsilon. An attacker sees one value and must tell which sample it came from. The
*positive* sample is the one with the larger median (ties: the unlearned sample). Two families of
threshold rules are tried:

* single threshold: predict positive when f >= t, for t on ``ceil(100 * range)`` evenly spaced
  points covering [min, max] of the pooled values (both ends included);
* double threshold: predict "the peakier sample" (smaller range; on a tie, the sample that is *not*
  the positive one) when t_l <= f <= t_r. With w the peakier sample's range and m its maximum,
  t_r runs over ``ceil(100 * 4)`` points on [m - 2, m + 2] and, for each t_r, t_l runs over 400
  points on [t_r - w - 2, t_r - w + 2] (about 160,000 pairs).

For each rule, with FPR and FNR its false positive / false negative rates over the N + N values,

    eps = max( ln((1 - delta - FPR) / FNR), ln((1 - delta - FNR) / FPR) ),  clipped at >= 0,

with delta = 1e-5. A rule with FPR = FNR = 0 (perfect separation) gives eps = inf; a rule with
exactly one of FPR, FNR equal to 0 is discarded (read as too few samples), as is a rule for which
both logarithms are undefined (FPR = FNR = 1: the rule is perfectly wrong). eps_s is the largest
eps over the rules kept, clipped to [0, 50]. Before any of this, if the smaller of the two ranges is
under 1% of the larger one (one sample is nearly a point mass), eps_s = 50.

Binning. Epsilons are put in bins of width 0.5: bin k (k = 0, 1, ...) is [0.5 k, 0.5 k + 0.5) and
scores H = 2^-k (so 1, 1/2, 1/4, ...; the write-up's H = 2 / 2^n with n = k + 1). Only bins that
end at or below ``ceil(ln(N - 1))`` exist, i.e. ``2 * ceil(ln(N - 1))`` bins; an epsilon beyond the
last bin scores 0. (The cap reflects the largest epsilon N samples can resolve.) N = 8 gives 4 bins,
N = 32 gives 8, N = 128 gives 10, N = 256 gives 12, N = 512 (the challenge) gives 14.

    F = mean over forget examples of H(eps_s),  in [0, 1],
    final score = F * (RA_U / RA_R) * (TA_U / TA_R)

where RA and TA are mean retain and held-out (test) utilities of the unlearned (U) and retrained
(R) models; the ratios are not clipped, as in the organisers' ``main.py``.

Finite-sample caveat
--------------------
Identical statistics on both sides give F = 1 exactly, but F is far from 1 for two samples drawn
from the *same* distribution: with finite N, the attack grid almost always finds a threshold whose
empirical rates look distinguishable. Measured here with two independent N(0, 1) samples per
example (20 examples per draw, 40 seeded draws per N; mean F, its standard deviation over draws,
and the [min, max] over draws):

    N =   8: F = 0.185 +- 0.017  [0.150, 0.237]
    N =  32: F = 0.186 +- 0.022  [0.150, 0.256]
    N = 128: F = 0.185 +- 0.028  [0.122, 0.272]
    N = 256: F = 0.189 +- 0.023  [0.148, 0.241]

The published code gives exactly the same F on the same arrays (checked on two of these draws
per N and on the three fixed draws hard-coded in tests/test_challenge_score.py).
So an unlearning method should be compared with a ceiling -- reference models against
independently seeded reference models under the same N and statistic -- not with 1.

Departures from the published code (numerical details only)
-----------------------------------------------------------
* Rates are exact fractions of N in float64; the published code averages in float32, so individual
  epsilons agree to within 2e-6 (N <= 256 in our checks) and F agrees unless an epsilon sits
  within that of a bin edge.
* Inputs are converted to float64 (the published code keeps float32 inputs in float32).
* When both samples are constant and equal, eps = 0 (the published code finds no usable rule and
  fails its assertion). For any other input on which every rule is discarded we raise ValueError
  (the published code fails the same assertion). In practice this happens only when the values
  spread over less than about one grid step (0.01), e.g. N = 2 normals with standard deviation
  0.01 (5 of 600 draws) or statistics rounded to 1e-3; the grid is in absolute units of the
  statistic, so F is not scale-invariant and the statistic should spread over many grid steps
  (the challenge's logit-scaled confidences spread over units).
* The single-threshold grid is built in float64 with np.linspace; the published code builds it with
  torch.linspace, whose result has torch's default dtype (float32), so its thresholds differ from
  ours by float32 rounding (~1e-7 relative). This can only matter for statistic values lying within
  that distance of a grid point (e.g. heavily rounded statistics), not for continuous ones.
* ``forget_score`` requires N >= 3: with N = 2, ceil(ln(1)) = 0 leaves no bins and the published
  code scores every input, identical ones included, as F = 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
BIN_WIDTH = 0.5
PEAKY_RANGE_RATIO = 0.01
DOUBLE_THRESHOLD_BUFFER = 2.0

__all__ = [
    "DELTA",
    "EPSILON_CAP",
    "epsilon_for_example",
    "forget_score",
    "bootstrap_interval",
    "final_score",
    "score_for_epsilon",
    "bin_count",
]


# ---------------------------------------------------------------------------------------------
# input checks


def _as_sample(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per model), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return a


def _as_matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape [examples, models], got shape {a.shape}")
    if a.shape[0] < 1:
        raise ValueError(f"{name} has no forget examples")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return a


def _check_pair(unlearned: Any, reference: Any, min_models: int) -> tuple[np.ndarray, np.ndarray]:
    u = _as_matrix(unlearned, "unlearned")
    r = _as_matrix(reference, "reference")
    if u.shape != r.shape:
        raise ValueError(f"unlearned and reference shapes differ: {u.shape} vs {r.shape}")
    if u.shape[1] < min_models:
        raise ValueError(
            f"need at least {min_models} models per side, got N = {u.shape[1]}"
            + (" (with N = 2 there are no epsilon bins: ceil(ln(N - 1)) = 0)" if u.shape[1] == 2 else "")
        )
    return u, r


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (0.0 <= delta < 1.0):
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    return delta


# ---------------------------------------------------------------------------------------------
# threshold grids and error rates


def _count_at_least(sorted_x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For each t, how many x >= t."""
    return sorted_x.size - np.searchsorted(sorted_x, t, side="left")


def _count_inside(sorted_x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each (lo, hi), how many x with lo <= x <= hi (0 when lo > hi)."""
    n = np.searchsorted(sorted_x, hi, side="right") - np.searchsorted(sorted_x, lo, side="left")
    return np.maximum(n, 0)


def _single_threshold_errors(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-positive and false-negative counts of the rules 'positive iff f >= t'."""
    lo = float(min(pos.min(), neg.min()))
    hi = float(max(pos.max(), neg.max()))
    steps = int(math.ceil((hi - lo) * THRESHOLDS_PER_UNIT))
    t = np.linspace(lo, hi, num=steps)
    fp = _count_at_least(np.sort(neg), t)
    fn = pos.size - _count_at_least(np.sort(pos), t)
    return fp, fn


def _double_threshold_errors(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-positive and false-negative counts of 'the peakier sample iff t_l <= f <= t_r'."""
    pos_range = pos.max() - pos.min()
    neg_range = neg.max() - neg.min()
    width = min(pos_range, neg_range)
    # The peakier sample (smaller range) is the class predicted inside the window; on a tie the
    # roles swap, as in the published code.
    peaky, other = (neg, pos) if pos_range >= neg_range else (pos, neg)
    buf = DOUBLE_THRESHOLD_BUFFER
    r_lo = peaky.min() + width - buf
    r_hi = peaky.max() + buf
    n_right = int(math.ceil((r_hi - r_lo) * THRESHOLDS_PER_UNIT))
    right = np.linspace(r_lo, r_hi, num=n_right)
    n_left = int(math.ceil(2 * buf * THRESHOLDS_PER_UNIT))
    # One row of left thresholds per right threshold; np.linspace with array ends computes each
    # row exactly as a scalar call would.
    left = np.linspace(right - width - buf, right - width + buf, num=n_left, axis=-1).reshape(-1)
    right = np.repeat(right, n_left)
    fp = _count_inside(np.sort(other), left, right)
    fn = peaky.size - _count_inside(np.sort(peaky), left, right)
    return fp, fn


def _epsilons_from_errors(fp: np.ndarray, fn: np.ndarray, n: int, delta: float) -> np.ndarray:
    """Epsilon of each rule; nan for discarded rules, inf for perfect separation."""
    fpr = fp / n
    fnr = fn / n
    eps = np.full(fp.shape, np.nan)
    eps[(fp == 0) & (fn == 0)] = np.inf
    both = (fp > 0) & (fn > 0)
    a_fpr, a_fnr = fpr[both], fnr[both]
    num1 = 1.0 - delta - a_fpr
    num2 = 1.0 - delta - a_fnr
    with np.errstate(invalid="ignore", divide="ignore"):
        e1 = np.where(num1 > 0, np.log(np.where(num1 > 0, num1, 1.0)) - np.log(a_fnr), np.nan)
        e2 = np.where(num2 > 0, np.log(np.where(num2 > 0, num2, 1.0)) - np.log(a_fpr), np.nan)
    e = np.fmax(e1, e2)  # nan only where both are undefined
    eps[both] = np.where(np.isnan(e), np.nan, np.maximum(e, 0.0))
    return eps


def _epsilon(unlearned: np.ndarray, reference: np.ndarray, delta: float) -> float:
    n = unlearned.size
    if np.median(reference) > np.median(unlearned):
        pos, neg = reference, unlearned
    else:
        pos, neg = unlearned, reference

    pos_range = pos.max() - pos.min()
    neg_range = neg.max() - neg.min()
    largest, smallest = max(pos_range, neg_range), min(pos_range, neg_range)
    if largest == 0.0:
        if pos[0] == neg[0]:
            return 0.0  # both samples are the same constant: nothing can tell them apart
    elif smallest / largest < PEAKY_RANGE_RATIO:
        return EPSILON_CAP

    fp_d, fn_d = _double_threshold_errors(pos, neg)
    fp_s, fn_s = _single_threshold_errors(pos, neg)
    # Epsilon depends on a rule only through its (FP, FN) counts, and ~160,000 rules share at most
    # (N + 1)^2 distinct count pairs: evaluate each distinct pair once.
    codes = np.concatenate([fp_d, fp_s]) * (n + 1) + np.concatenate([fn_d, fn_s])
    seen = np.zeros((n + 1) * (n + 1), dtype=bool)
    seen[codes] = True
    fp, fn = np.divmod(np.flatnonzero(seen), n + 1)
    eps = _epsilons_from_errors(fp, fn, n, delta)
    kept = eps[~np.isnan(eps)]
    if kept.size == 0:
        raise ValueError(
            "no threshold rule gave a usable epsilon (each had exactly one zero error rate); the "
            "values spread over less than the 0.01 threshold grid -- rescale the statistic"
        )
    return float(np.clip(kept.max(), 0.0, EPSILON_CAP))


# ---------------------------------------------------------------------------------------------
# public API


def epsilon_for_example(unlearned: np.ndarray, reference: np.ndarray, delta: float = DELTA) -> float:
    """Estimated epsilon, in [0, 50], for one forget example.

    `unlearned` and `reference` hold the example's statistic under each of N unlearned and N
    retrained models (same N, N >= 2, finite values)."""
    u = _as_sample(unlearned, "unlearned")
    r = _as_sample(reference, "reference")
    if u.shape != r.shape:
        raise ValueError(f"unlearned and reference must have the same number of models: {u.size} vs {r.size}")
    if u.size < 2:
        raise ValueError(f"need at least 2 models per side, got N = {u.size}")
    return _epsilon(u, r, _check_delta(delta))


def bin_count(n_models: int) -> int:
    """Number of epsilon bins for N models: 2 * ceil(ln(N - 1)) bins of width 0.5."""
    if n_models < 3:
        raise ValueError(f"need at least 3 models per side for any epsilon bin, got N = {n_models}")
    return int(math.ceil(math.log(n_models - 1)) / BIN_WIDTH)


def score_for_epsilon(eps: float, n_models: int) -> float:
    """H: 1 for eps in [0, 0.5), 1/2 for [0.5, 1), ... and 0 beyond the last bin."""
    k = math.floor(eps / BIN_WIDTH)
    return 0.5**k if 0 <= k < bin_count(n_models) else 0.0


def forget_score(unlearned: np.ndarray, reference: np.ndarray, delta: float = DELTA) -> dict:
    """Forgetting quality F of the challenge.

    `unlearned` and `reference` have shape [examples, N]: row s holds forget example s's statistic
    under each unlearned / retrained model (N >= 3). Returns F, the per-example epsilons and
    scores H, N, the number of examples, the number of bins and the largest binned epsilon."""
    u, r = _check_pair(unlearned, reference, min_models=3)
    delta = _check_delta(delta)
    n_examples, n_models = u.shape
    epsilons = []
    for i in range(n_examples):
        try:
            epsilons.append(_epsilon(u[i], r[i], delta))
        except ValueError as exc:
            raise ValueError(f"forget example {i}: {exc}") from None
    h = [score_for_epsilon(e, n_models) for e in epsilons]
    return {
        "F": float(sum(h) / n_examples),
        "epsilons": epsilons,
        "H": h,
        "n_models": int(n_models),
        "n_examples": int(n_examples),
        "max_bins": bin_count(n_models),
        "max_epsilon": float(math.ceil(math.log(n_models - 1))),
    }


def bootstrap_interval(
    unlearned: np.ndarray,
    reference: np.ndarray,
    rounds: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of F over forget examples.

    Rows (forget examples) are resampled with replacement, `rounds` times, by a numpy Generator
    seeded with `seed`; the models stay fixed, so per-example epsilons are computed once. The
    interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled F."""
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds}")
    if not (0.0 < level < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level}")
    res = forget_score(unlearned, reference)
    h = np.asarray(res["H"], dtype=np.float64)
    n = h.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(int(rounds), n))
    fs = h[idx].sum(axis=1) / n
    lo, hi = np.quantile(fs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def final_score(
    F: float,
    retain_utility_u: float,
    retain_utility_r: float,
    heldout_utility_u: float,
    heldout_utility_r: float,
) -> float:
    """F * (RA_U / RA_R) * (TA_U / TA_R); the utility ratios are not clipped."""
    vals = {
        "F": F,
        "retain_utility_u": retain_utility_u,
        "retain_utility_r": retain_utility_r,
        "heldout_utility_u": heldout_utility_u,
        "heldout_utility_r": heldout_utility_r,
    }
    for name, v in vals.items():
        if not math.isfinite(float(v)):
            raise ValueError(f"{name} must be finite, got {v}")
    if not (0.0 <= float(F) <= 1.0):
        raise ValueError(f"F must be in [0, 1], got {F}")
    if retain_utility_r <= 0 or heldout_utility_r <= 0:
        raise ValueError("reference utilities must be positive (they are divisors)")
    return (
        float(F)
        * (float(retain_utility_u) / float(retain_utility_r))
        * (float(heldout_utility_u) / float(heldout_utility_r))
    )
