"""`sift eval --benchmark tofu|muse-news|muse-books`: a model on a published benchmark's own
evaluation sets, read from the hub (or a local copy), scored as open-unlearning scores it.

TOFU: forget = <split>_perturbed, retain = retain_perturbed, real authors and world facts as the
general sets, holdout01|05|10 for membership inference (open-unlearning's configs/eval/tofu.yaml):
every metric of `sift eval`, model_utility over its nine values. MUSE: sift.evaluation.muse.
The benchmark, its source and the template are recorded in every result.
"""

from __future__ import annotations

from typing import Any

from sift.errors import SiftError
from sift.evaluation.run import (
    EvalSettings,
    _hashed_sample,
    check_reference_choice,
    evaluate,
    sample_general,
    saved_reference,
)

BENCHMARK_NAMES = ("tofu", "muse-news", "muse-books")


def evaluate_tofu(
    model: str,
    forget_split: str,
    source: str | None = None,
    reference: str | None = None,
    no_reference: bool = False,
    settings: EvalSettings | None = None,
    target_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """open-unlearning's TOFU table for `model` (any MODEL form of `sift eval`) against the
    retain model `reference` (a MODEL or its saved result)."""
    from sift.benchmarks import tofu
    from sift.evaluation.targets import open_target

    s = settings or EvalSettings()
    check_reference_choice(reference, no_reference)
    s.check()
    src = source or tofu.HUB
    sets = tofu.eval_sets(forget_split, src)
    retain = _hashed_sample(sets.retain, s.retain_sample)
    ra, wf = sample_general(sets.ra, s.general_sample), sample_general(sets.wf, s.general_sample)
    opts = target_options or {}
    base = opts.get("base_name")

    def run(spec: str, ref: dict[str, Any] | None, options: dict[str, Any], require: bool) -> dict[str, Any]:
        target = open_target(spec, **options)
        return evaluate(target, sets.forget, retain, wf, sets.holdout, ref, s, require_reference=require, ra=ra)

    ref_result = None
    if reference is not None:
        ref_result = saved_reference(reference) or run(reference, None, {"base_name": base}, False)
    result = run(model, ref_result, opts, not no_reference)
    if ref_result is not None:
        result["reference_metrics"] = ref_result["metrics"]
    result["benchmark"] = {"name": "tofu", "forget_split": forget_split, "source": src}
    return result


def evaluate_muse_model(
    model: str,
    corpus: str,
    source: str | None = None,
    reference: str | None = None,
    settings: Any = None,
    target_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """MUSE's metrics for `model` on `corpus` (muse-news, muse-books); `reference` the retrained
    model (a MODEL or its saved result) for PrivLeak, else AUC_ref 0.5."""
    from sift.benchmarks import muse
    from sift.evaluation.muse import MuseSettings, evaluate_muse
    from sift.evaluation.targets import open_target

    s = settings or MuseSettings()
    s.check()
    sets = muse.eval_sets(corpus, source)
    ref_result = None
    if reference is not None:
        ref_result = saved_reference(reference)
        if ref_result is None:
            base = (target_options or {}).get("base_name")
            ref_result = evaluate_muse(open_target(reference, base_name=base), sets, s)
        elif "mia_min_k" not in ref_result.get("metrics", {}):
            raise SiftError(f"{reference} holds no mia_min_k: save a MUSE `sift eval --out` of the retrained model")
    result = evaluate_muse(open_target(model, **(target_options or {})), sets, s, ref_result)
    result["benchmark"] = {"name": corpus, "source": source or muse.HUBS[corpus]}
    return result
