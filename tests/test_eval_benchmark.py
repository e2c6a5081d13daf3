"""`sift eval --benchmark tofu|muse-news` end to end on local copies with the hub's schemas, in
process through typer's runner: open-unlearning's TOFU table (nine-value model utility, the
forget split's own sets, the template recorded) and MUSE's metrics, with their refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sift.cli import app

RUNNER = CliRunner()


def tofu_args(folder, *more):
    return [
        "eval",
        "builtin-tiny",
        "--benchmark",
        "tofu",
        "--forget-split",
        "forget01",
        "--benchmark-source",
        str(folder),
        *more,
    ]


FAST = ["--max-new-tokens", "4", "--retain-sample", "6", "--general-sample", "4", "--batch-size", "32"]


def run(args):
    return RUNNER.invoke(app, args)


def error_line(result) -> str:
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("sift: error: "), (
        result.exit_code,
        result.stderr,
    )
    return lines[0]


def test_tofu_table_of_a_model_against_itself_as_reference(tofu_dir, tmp_path):
    saved = tmp_path / "ref.json"
    args = tofu_args(tofu_dir)
    r = run([*args, *FAST, "--template", "tofu", "--no-reference", "--out", str(saved), "--json"])
    assert r.exit_code == 0, r.stderr
    ref = json.loads(r.stdout)
    assert ref["benchmark"] == {"name": "tofu", "forget_split": "forget01", "source": str(tofu_dir)}
    assert ref["n"] == {"forget": 40, "retain": 6, "wf": 4, "ra": 4, "holdout": 40}
    assert ref["settings"]["template"] == "tofu" and ref["settings"]["answer_span"] == "sift"
    m = ref["metrics"]
    for name in (
        "ra_Q_A_Prob_normalised",
        "ra_Q_A_ROUGE",
        "ra_Truth_Ratio",
        "wf_Truth_Ratio",
        "forget_truth_ratio_prob_mean",
    ):
        assert name in m, name
    nine = [m[n] for n in ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio")]
    nine += [m[f"{s}_{x}"] for s in ("ra", "wf") for x in ("Q_A_Prob_normalised", "Q_A_ROUGE", "Truth_Ratio")]
    from scipy.stats import hmean

    assert m["model_utility"] == (0.0 if min(nine) <= 0 else pytest.approx(float(hmean(nine))))
    # the same model against its own saved result: indistinguishable, and no leak
    r = run([*args, *FAST, "--template", "tofu", "--reference", str(saved), "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["metrics"]["forget_quality"] == 1.0 and out["metrics"]["privleak"] == pytest.approx(0.0, abs=1e-6)
    assert out["forget_quality"]["n"] == 40
    # scored another way than the reference: refused, not compared
    assert "template 'tofu', this model with 'chat'" in error_line(run([*args, *FAST, "--reference", str(saved)]))


def test_tofu_answer_span_changes_the_scores_and_is_recorded(tofu_dir):
    args = tofu_args(tofu_dir, *FAST, "--no-reference", "--json")
    a = json.loads(run(args).stdout)
    b = run([*args, "--answer-span", "open-unlearning"])
    assert b.exit_code == 0, b.stderr
    b = json.loads(b.stdout)
    assert b["settings"]["answer_span"] == "open-unlearning"
    assert a["metrics"]["forget_Q_A_Prob"] != b["metrics"]["forget_Q_A_Prob"]


def test_muse_metrics_end_to_end(muse_dir, tmp_path):
    saved = tmp_path / "retrained.json"
    args = ["eval", "builtin-tiny", "--benchmark", "muse-news", "--benchmark-source", str(muse_dir), "--json"]
    r = run([*args, "--out", str(saved)])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    m = out["metrics"]
    assert set(m) >= {"forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "mia_min_k", "privleak"}
    assert all(
        0 <= m[k] <= 1 for k in ("forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "mia_min_k")
    )
    assert out["reference_auc"] == 0.5 and out["benchmark"] == {"name": "muse-news", "source": str(muse_dir)}
    assert out["settings"]["verbmem_new_tokens"] == 128 and out["settings"]["knowmem_new_tokens"] == 32
    full = json.loads(saved.read_text())
    assert len(full["per_row"]["verbmem_rougeL_f1"]) == 4 and len(full["per_row"]["mia_min_k_holdout"]) == 4
    # against itself as the retrained model: no leak
    r = run([*args, "--reference", str(saved)])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["privleak"] == pytest.approx(0.0, abs=1e-6)


def test_benchmark_refusals(tofu_dir, muse_dir, tmp_path):
    base = ["eval", "builtin-tiny"]
    assert "unknown benchmark 'tofu2'" in error_line(run([*base, "--benchmark", "tofu2", "--no-reference"]))
    assert "leave out --data" in error_line(
        run([*base, "--benchmark", "tofu", "--data", str(tmp_path / "x.jsonl"), "--no-reference"])
    )
    assert "forget split is one of" in error_line(
        run(
            [
                *base,
                "--benchmark",
                "tofu",
                "--forget-split",
                "forget07",
                "--benchmark-source",
                str(tofu_dir),
                "--no-reference",
            ]
        )
    )
    assert "--forget-split is TOFU's" in error_line(
        run([*base, "--benchmark", "muse-news", "--forget-split", "forget01", "--benchmark-source", str(muse_dir)])
    )
    assert "leave out --template" in error_line(
        run([*base, "--benchmark", "muse-news", "--template", "tofu", "--benchmark-source", str(muse_dir)])
    )
    assert "unknown template 'alpaca'" in error_line(
        run(
            [
                *base,
                "--benchmark",
                "tofu",
                "--template",
                "alpaca",
                "--benchmark-source",
                str(tofu_dir),
                "--no-reference",
            ]
        )
    )
    assert "give --data" in error_line(run([*base, "--no-reference"]))
    assert "go with --benchmark" in error_line(
        run([*base, "--data", str(tmp_path / "x.jsonl"), "--forget-split", "forget01", "--no-reference"])
    )
