"""Metrics are registered functions that compute: sift eval and sift compare take every value
from the registry, so a metric added with one register line is computed, reported and
documented with nothing else touched."""

import math

import pytest

from sift.evaluation import metrics as M


def _scores():
    def row(i):
        return {"id": f"r{i}", "completion": "Krabous", "answer": "Krabous"}

    forget = M.SetScores(
        rows=[row(0), row(1)],
        answer_loss=[math.log(2.0), math.log(4.0)],  # Prob 1/2 and 1/4
        token_logprobs=[[-1.0, -2.0], [-3.0]],
        token_z=[[0.0], [1.0]],
        para_loss=[1.0, 1.0],
        pert_losses=[[1.0], [2.0]],  # R = 1 and exp(-1)
        answers=["Krabous", "no"],
        rouge=[1.0, 0.0],
    )
    holdout = M.SetScores(rows=[row(2)], answer_loss=[5.0], token_logprobs=[[-9.0]], token_z=[[3.0]])
    return {"forget": forget, "retain": forget, "wf": M.SetScores([], [], [], []), "holdout": holdout}


def test_every_metric_computes_from_a_known_source():
    for m in M.METRICS.values():
        assert callable(m.compute) and m.source in M.SOURCES, m.name
    with pytest.raises(ValueError, match="unknown metric source"):
        M.compute_metrics("nowhere", M.MetricInputs())


def test_model_metrics_by_hand_and_wf_left_out_without_general_questions():
    out = M.compute_metrics("model", M.MetricInputs(sets=_scores(), min_k=0.5))
    assert out["forget_Q_A_Prob"] == pytest.approx(0.375)
    assert out["forget_Q_A_ROUGE"] == 0.5 and out["forget_exact"] == 0.5 and out["forget_contains"] == 0.5
    assert out["forget_truth_ratio"] == pytest.approx((1.0 + math.exp(-1.0)) / 2, abs=1e-9)
    assert not any(k.startswith("wf_") for k in out)  # no general questions: left out, not nan
    assert out["model_utility"] == pytest.approx(M.model_utility([0.375, 0.5, out["retain_Truth_Ratio"]]))
    assert out["mia_loss"] == 1.0  # the held-out row's loss is above both forget rows'
    assert "forget_quality" not in out and "privleak" not in out and "seconds" not in out


def test_reference_relearn_and_cost_metrics_read_their_own_inputs():
    ref = M.ReferenceScores({"p": 0.25, "log10_p": math.log10(0.25), "n": 2, "n_ref": 2}, auc_min_k=0.5)
    out = M.compute_metrics("reference", M.MetricInputs(values={"mia_min_k": 1.0}, reference=ref))
    assert out == {"forget_quality": 0.25, "privleak": pytest.approx(-100.0)}
    assert M.compute_metrics("reference", M.MetricInputs()) == {}  # no reference: both left out
    r = {"after": {"contains": 0.5, "answer_nll": 1.5}, "regained_contains": 0.25}
    assert M.compute_metrics("relearn", M.MetricInputs(relearn=r)) == {
        "relearn_contains": 0.5,
        "relearn_regained": 0.25,
        "relearn_nll": 1.5,
    }
    assert M.compute_metrics("cost", M.MetricInputs(cost={"seconds": 3.0, "other": 1.0})) == {"seconds": 3.0}


def test_a_registered_metric_is_computed_and_documented(monkeypatch):
    rows = M.Metric(
        "forget_rows", "closer to the reference", "forget rows scored", lambda i: len(i.sets["forget"].rows)
    )
    monkeypatch.setitem(M.METRICS, rows.name, rows)
    assert M.compute_metrics("model", M.MetricInputs(sets=_scores()))["forget_rows"] == 2
    assert "forget_rows: closer to the reference is better" in M.metrics_help()
    assert "| `forget_rows` |" in M.metrics_markdown()
