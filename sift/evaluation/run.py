"""`sift eval`: every metric of sift.evaluation.metrics for one model, on forget, retain,
general-knowledge and held-out rows, against a retain reference.

Rows are the data set's JSON objects. Forget and retain rows need `prompt`, `completion` and
`answer` (the fact's value, for the contains recall); the truth ratio also needs
`paraphrased_completion` and `perturbed_completions` (the builtin data set carries them). Held-out
rows (people never trained on, `sift builtin-data --split holdout`) need `prompt` and `completion`.

The result is one JSON object. It carries the per-row truth ratios and MIA scores, so a saved
result of the retain reference serves as the reference for later runs (as open-unlearning's
retain logs do): forget_quality and privleak read `per_row.forget_truth_ratio` and
`metrics.mia_min_k` from it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sift.data import parse_jsonl_text
from sift.errors import SiftError
from sift.evaluation import metrics as M
from sift.evaluation.likelihood import AnswerScore, rouge_l_recall, score_answers
from sift.evaluation.targets import Target
from sift.hashing import hash_order
from sift.models import PromptFormat
from sift.serving.generate import greedy_answers

SETS = ("forget", "retain", "wf", "ra", "holdout")  # ra: real authors, TOFU only


@dataclass
class EvalSettings:
    batch_size: int = 16
    max_new_tokens: int = 200  # open-unlearning's generation default; answers stop at EOS
    min_k: float = 0.4  # TOFU and MUSE configs
    retain_sample: int | None = None  # score this many retain rows (a fixed, id-hashed choice); None: all
    general_sample: int | None = None  # and this many general-knowledge questions; None: all
    # how questions and answers become tokens (sift.models.PromptFormat): training's own by
    # default; "tofu" and "open-unlearning" score as open-unlearning's TOFU and MUSE numbers do
    template: str = "chat"
    answer_span: str = "sift"
    system_prompt: str | None = None
    date_string: str | None = None

    def prompt_format(self) -> PromptFormat:
        return PromptFormat(self.template, self.answer_span, self.system_prompt, self.date_string)

    def check(self) -> None:
        self.prompt_format().check()
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise SiftError("batch size and max new tokens must be at least 1")
        if not 0 < self.min_k <= 1:
            raise SiftError(f"--min-k must lie in (0, 1], got {self.min_k}")
        if self.retain_sample is not None and self.retain_sample < 1:
            raise SiftError("--retain-sample must be at least 1")
        if self.general_sample is not None and self.general_sample < 0:
            raise SiftError("--general-sample must be at least 0")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """JSONL rows (parsed as training data is, sift.data); one clear error for a row without a
    string id or a duplicate id."""
    p = Path(path)
    if not p.is_file():
        raise SiftError(f"{path}: no such file")
    rows = parse_jsonl_text(p.read_text(encoding="utf-8"), str(path))
    seen: set[str] = set()
    for n, rec in enumerate(rows, 1):
        if not isinstance(rec.get("id"), str):
            raise SiftError(f"{path}: row {n}: a row must have a string 'id'")
        if rec["id"] in seen:
            raise SiftError(f"{path}: row {n}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
    return rows


HOLDOUT_NEEDED = (
    "membership inference needs --holdout (rows of people never trained on; "
    "`sift builtin-data --split holdout --people 2 > holdout.jsonl` for the builtin data)"
)


def read_holdout(path: str | Path | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The held-out rows of `path`, which must be given and share no id with the data."""
    if path is None:
        raise SiftError(HOLDOUT_NEEDED)
    held = read_rows(path)
    check_unseen(held, rows)
    return held


def check_unseen(holdout: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Held-out rows stand for people never trained on: none may be in the data."""
    overlap = {r["id"] for r in holdout} & {r["id"] for r in rows}
    if overlap:
        raise SiftError(
            f"{len(overlap)} held-out id(s) are also in the data (e.g. {sorted(overlap)[0]!r}); held-out rows must be unseen"
        )


REFERENCE_NEEDED = (
    "forget_quality and privleak compare with the retain reference (a model trained without the forget rows): "
    "pass --reference MODEL or a saved eval JSON of it, or --no-reference to leave both out"
)


def check_reference_choice(reference: object | None, no_reference: bool) -> None:
    """A reference, or the explicit choice to go without one: never a silent null."""
    if reference is not None and no_reference:
        raise SiftError("give --reference or --no-reference, not both")
    if reference is None and not no_reference:
        raise SiftError(REFERENCE_NEEDED)


def read_reference_result(path: Path) -> dict[str, Any]:
    """A saved `sift eval --out` result, as a reference."""
    import json

    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SiftError(f"{path}: not JSON ({exc.msg})") from None
    if not isinstance(result, dict) or "per_row" not in result or "metrics" not in result:
        raise SiftError(f"{path} is not a saved `sift eval` result")
    return result


def saved_reference(reference: str) -> dict[str, Any] | None:
    """The saved result a --reference names (a .json file), or None when it names a model."""
    path = Path(reference)
    return read_reference_result(path) if path.is_file() and path.suffix == ".json" else None


def _hashed_sample(rows: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """The n rows whose ids hash lowest: the same choice for the same ids, in any order."""
    if n is None or n >= len(rows):
        return sorted(rows, key=lambda r: r["id"])
    chosen = hash_order(rows, key=lambda r: r["id"])[:n]
    return sorted(chosen, key=lambda r: r["id"])


def sample_general(general: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """The general questions scored: all, or a fixed id-hashed choice of n."""
    return _hashed_sample(general, n) if n != 0 else []


def split_rows(
    rows: list[dict[str, Any]], forget_ids: list[str], retain_sample: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(forget rows, retain rows) by id; unknown ids are an error."""
    wanted = set(forget_ids)
    known = {r["id"] for r in rows}
    unknown = sorted(wanted - known)
    if unknown:
        raise SiftError(f"{len(unknown)} forget id(s) are not in the data: {', '.join(map(repr, unknown[:5]))}")
    if not wanted:
        raise SiftError("no forget ids given")
    forget = sorted((r for r in rows if r["id"] in wanted), key=lambda r: r["id"])
    retain = _hashed_sample([r for r in rows if r["id"] not in wanted], retain_sample)
    if not retain:
        raise SiftError("every row is in the forget set; model utility needs retain rows")
    return forget, retain


def _check_fields(name: str, rows: list[dict[str, Any]], fields: tuple[str, ...]) -> None:
    for r in rows:
        for f in fields:
            v = r.get(f)
            ok = (
                (isinstance(v, str) and v.strip())
                if f != "perturbed_completions"
                else (isinstance(v, list) and v and all(isinstance(x, str) and x.strip() for x in v))
            )
            if not ok:
                raise SiftError(
                    f"{name} row {r.get('id')!r} lacks {f!r} (the truth ratio needs paraphrased and perturbed answers; "
                    "the builtin data set has them)"
                )


def check_rows(
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    general: list[dict[str, Any]],
    holdout: list[dict[str, Any]],
    ra: list[dict[str, Any]] | None = None,
) -> None:
    """Every field the metrics need, checked before any model is loaded or trained."""
    _check_fields(
        "forget", forget, ("prompt", "completion", "answer", "paraphrased_completion", "perturbed_completions")
    )
    _check_fields(
        "retain", retain, ("prompt", "completion", "answer", "paraphrased_completion", "perturbed_completions")
    )
    _check_fields("general", general, ("prompt", "completion", "perturbed_completions"))
    _check_fields("real-authors", ra or [], ("prompt", "completion", "perturbed_completions"))
    if not holdout:
        raise SiftError(
            "membership inference needs held-out rows (people never trained on): pass --holdout "
            "(e.g. `sift builtin-data --split holdout --people 2 > holdout.jsonl`)"
        )
    _check_fields("holdout", holdout, ("prompt", "completion"))


def evaluate(
    target: Target,
    forget: list[dict[str, Any]],
    retain: list[dict[str, Any]],
    general: list[dict[str, Any]],
    holdout: list[dict[str, Any]],
    reference: dict[str, Any] | None,
    settings: EvalSettings | None = None,
    require_reference: bool = True,
    ra: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate `target`; `reference` is an earlier result of this function for the retain
    reference (needed for forget_quality and privleak unless require_reference is False).
    `general` are world-facts rows (wf_*), `ra` real-authors rows (ra_*, TOFU's)."""
    s = settings or EvalSettings()
    s.check()
    if reference is None and require_reference:
        raise SiftError(REFERENCE_NEEDED)
    check_rows(forget, retain, general, holdout, ra)
    started = time.perf_counter()
    fmt = s.prompt_format()

    items = [(name, r) for name, rows in zip(SETS, (forget, retain, general, ra or [], holdout)) for r in rows]
    scored: list[dict[str, Any]] = [{} for _ in items]
    answers: list[str] = [""] * len(items)
    for model, tok, idx in target.groups([r["prompt"] for _, r in items]):
        pairs, owners = [], []
        for i in idx:
            name, r = items[i]
            pairs.append((r["prompt"], r["completion"]))
            owners.append((i, "answer"))
            if name in ("forget", "retain"):
                pairs.append((r["prompt"], r["paraphrased_completion"]))
                owners.append((i, "para"))
            if name != "holdout":
                for w in r["perturbed_completions"]:
                    pairs.append((r["prompt"], w))
                    owners.append((i, "pert"))
        for (i, key), sc in zip(owners, score_answers(model, tok, pairs, s.batch_size, fmt=fmt)):
            if key == "pert":
                scored[i].setdefault("pert", []).append(sc)
            else:
                scored[i][key] = sc
        ask = [i for i in idx if items[i][0] != "holdout"]
        for i, a in zip(
            ask,
            greedy_answers(model, tok, [items[i][1]["prompt"] for i in ask], s.max_new_tokens, s.batch_size, fmt=fmt),
        ):
            answers[i] = a

    by_set: dict[str, list[int]] = {name: [i for i, (n, _) in enumerate(items) if n == name] for name in SETS}
    sets = {name: _set_scores(name, by_set[name], items, scored, answers) for name in SETS}
    inputs = M.MetricInputs(sets=sets, min_k=s.min_k, cost=dict(target.cost))
    out_metrics = M.compute_metrics("model", inputs)
    out_metrics.update(M.compute_metrics("cost", inputs))

    per_row: dict[str, dict[str, Any]] = {}
    for name in ("forget", "retain"):
        sc = sets[name]
        ids = [r["id"] for r in sc.rows]
        per_row[f"{name}_truth_ratio"] = dict(zip(ids, M.truth_ratios(sc)))
        per_row[f"{name}_Q_A_Prob"] = dict(zip(ids, M.answer_probs(sc)))
        per_row[f"{name}_answer"] = dict(zip(ids, sc.answers))
    for name in ("wf", "ra"):
        if sets[name].rows:
            per_row[f"{name}_answer"] = {r["id"]: a for r, a in zip(sets[name].rows, sets[name].answers)}
    for name in ("forget", "holdout"):
        mia = M.mia_scores(sets[name], s.min_k)
        per_row[f"mia_{name}"] = {r["id"]: {a: mia[a][j] for a in mia} for j, r in enumerate(sets[name].rows)}

    result = {
        "model": target.label,
        "kind": target.kind,
        "approximate": target.approximate,
        "n": {
            "forget": len(forget),
            "retain": len(retain),
            "wf": len(general),
            "ra": len(ra or []),
            "holdout": len(holdout),
        },
        "metrics": out_metrics,
        "forget_quality": None,
        "reference": None,
        "settings": asdict(s),
        "eval_seconds": round(time.perf_counter() - started, 3),
        "per_row": per_row,
    }
    if reference is not None:
        against_reference(result, reference)
    return result


def _set_scores(
    name: str, idx: list[int], items: list[tuple[str, dict[str, Any]]], scored: list[dict[str, Any]], answers: list[str]
) -> M.SetScores:
    """One set's scores, in its rows' order, from what the model groups produced."""
    rows = [items[i][1] for i in idx]
    answer: list[AnswerScore] = [scored[i]["answer"] for i in idx]
    sc = M.SetScores(
        rows=rows,
        answer_loss=[a.avg_loss for a in answer],
        token_logprobs=[a.token_logprobs for a in answer],
        token_z=[a.token_z for a in answer],
    )
    if name in ("forget", "retain"):
        sc.para_loss = [scored[i]["para"].avg_loss for i in idx]
    if name != "holdout":
        sc.pert_losses = [[p.avg_loss for p in scored[i]["pert"]] for i in idx]
        sc.answers = [answers[i] for i in idx]
        sc.rouge = rouge_l_recall(sc.answers, [r["completion"] for r in rows])
    return sc


def evaluate_model(
    model: str,
    data: str | Path,
    forget_ids: list[str],
    holdout: str | Path | None,
    reference: str | None = None,
    no_reference: bool = False,
    settings: EvalSettings | None = None,
    general: bool = True,
    merged: bool = False,
    router: str | None = None,
    fallback: str | None = None,
    base_model: str | None = None,
) -> dict[str, Any]:
    """`sift eval` as one call: read the rows, check every input before a model loads, score the
    reference (a MODEL, or a saved result JSON) on the same rows, then the model."""
    from sift.builtin.general import general_eval_rows
    from sift.evaluation.targets import open_target

    s = settings or EvalSettings()
    check_reference_choice(reference, no_reference)
    s.check()
    rows = read_rows(data)
    forget, retain = split_rows(rows, forget_ids, s.retain_sample)
    held = read_holdout(holdout, rows)
    gen_rows = sample_general(general_eval_rows(), s.general_sample) if general else []
    ref_result = None
    if reference is not None:
        ref_result = saved_reference(reference)
        if ref_result is None:
            ref_target = open_target(reference, base_name=base_model)
            ref_result = evaluate(ref_target, forget, retain, gen_rows, held, None, s, require_reference=False)
    target = open_target(model, merged=merged, router=router, fallback=fallback, base_name=base_model)
    result = evaluate(target, forget, retain, gen_rows, held, ref_result, s, require_reference=not no_reference)
    if ref_result is not None:
        result["reference_metrics"] = ref_result["metrics"]
    return result


def against_reference(result: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Add forget_quality and privleak to `result` (in place), from the reference's per-row truth
    ratios on the same forget ids and its Min-K% AUC."""
    mine = result["per_row"]["forget_truth_ratio"]
    ref_ratios = reference.get("per_row", {}).get("forget_truth_ratio", {})
    missing = [i for i in mine if i not in ref_ratios]
    if missing:
        raise SiftError(
            f"the reference has no truth ratio for {len(missing)} forget row(s) (e.g. {missing[0]!r}): evaluate it on the same forget ids"
        )
    fq = M.forget_quality(list(mine.values()), [ref_ratios[i] for i in mine])
    # the reference's Min-K% AUC, recomputed on exactly these forget and held-out rows
    ref_rows = reference.get("per_row", {})
    ref_k, my_k = reference.get("settings", {}).get("min_k"), result["settings"]["min_k"]
    if ref_k is not None and ref_k != my_k:
        raise SiftError(f"the reference was scored with Min-K k = {ref_k}, this model with k = {my_k}")
    for key, default in (("template", "chat"), ("answer_span", "sift"), ("system_prompt", None), ("date_string", None)):
        theirs, mine_ = reference.get("settings", {}).get(key, default), result["settings"].get(key, default)
        if theirs != mine_:
            raise SiftError(
                f"the reference was scored with {key} {theirs!r}, this model with {mine_!r}: score both the same way"
            )
    held = list(result["per_row"]["mia_holdout"])
    lacking = [
        i
        for i in list(mine) + held
        if i not in ref_rows.get("mia_forget", {}) and i not in ref_rows.get("mia_holdout", {})
    ]
    if lacking:
        raise SiftError(
            f"the reference has no membership scores for {len(lacking)} row(s) (e.g. {lacking[0]!r}): evaluate it with the same --holdout"
        )
    ref_score = {**ref_rows["mia_holdout"], **ref_rows["mia_forget"]}
    auc_ref = M.mia_auc([ref_score[i]["min_k"] for i in mine], [ref_score[i]["min_k"] for i in held])
    result["forget_quality"] = fq
    inputs = M.MetricInputs(values=dict(result["metrics"]), reference=M.ReferenceScores(fq, auc_ref))
    result["metrics"].update(M.compute_metrics("reference", inputs))
    result["reference"] = reference.get("model")
    return result


def metric_table(results: list[dict[str, Any]], names: list[str]) -> str:
    """A markdown table: one row per result, one column per metric (with its direction)."""
    head = (
        "| model | "
        + " | ".join(
            f"{n} ({'↑' if M.METRICS[n].better == 'higher' else '↓' if M.METRICS[n].better == 'lower' else '≈ref' if 'reference' in M.METRICS[n].better else '→0'})"
            for n in names
        )
        + " |"
    )
    lines = [head, "|" + "---|" * (len(names) + 1)]
    for r in results:
        cells = []
        for n in names:
            v = r["metrics"].get(n)
            cells.append("–" if v is None or (isinstance(v, float) and math.isnan(v)) else _fmt(v))
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.3f}"


metrics_help = M.metrics_help  # its old home; the registry keeps it now
