"""Worst-case forget sets: the capped-simplex projection, the upper level improving its objective,
and the search end to end on the tiny model (deterministic, K distinct rows, weights restored)."""

import numpy as np
import pytest
import torch

from sift.errors import SiftError
from sift.evaluation.worstcase import (
    WorstCaseSettings,
    project_capped_simplex,
    random_forget_set,
    search,
    worst_case_forget_set,
)


def test_projection_lands_on_the_capped_simplex_nearest_point():
    a = np.array([0.9, 0.2, 1.7, -0.4, 0.5])
    w = project_capped_simplex(a, 2.0)
    assert abs(w.sum() - 2.0) < 1e-8 and w.min() >= 0 and w.max() <= 1
    # the nearest point is clip(a - mu): every coordinate strictly inside (0, 1) moved by the same mu
    inside = (w > 1e-9) & (w < 1 - 1e-9)
    assert np.allclose((a - w)[inside], (a - w)[inside][0])
    assert np.allclose(project_capped_simplex(np.array([0.5, 0.5, 0.5, 0.5]), 2.0), 0.5)


def test_upper_level_descends_to_the_rows_that_keep_the_lowest_loss():
    losses = np.array([3.0, 0.5, 2.0, 0.1, 4.0, 1.0])  # a lower level whose losses do not depend on w
    out = search(lambda w: losses, len(losses), WorstCaseSettings(size=2, iterations=8, w_lr=0.5))
    assert out["chosen"] == [1, 3]  # the two rows the unlearned model still fits best
    h = out["objective_history"]
    assert all(b <= a + 1e-12 for a, b in zip(h, h[1:])) and h[-1] < h[0]
    assert out["chosen_mean_loss"] == pytest.approx(0.3)


def test_random_set_and_bad_sizes(facts):
    ids = random_forget_set(facts, 5, seed=0)
    assert len(set(ids)) == 5 and ids == random_forget_set(facts, 5, seed=0)
    with pytest.raises(SiftError):
        random_forget_set(facts, len(facts), seed=0)
    with pytest.raises(SiftError):
        WorstCaseSettings(size=0).check(10)


def test_search_on_the_tiny_model_is_deterministic_and_restores_the_weights(trained_ws, facts):
    from sift.adapters import open_peft_adapter
    from sift.models import load_base_model

    base = load_base_model("builtin-tiny")
    rows = facts[:12]

    def fresh():
        return open_peft_adapter(base.model, trained_ws.adapter_dir(0), is_trainable=True)

    s = WorstCaseSettings(size=3, iterations=2, unlearn_steps=1, batch_size=6)
    m = fresh()
    before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
    a = worst_case_forget_set(m, base.tokenizer, rows, s)
    after = [p.detach() for p in m.parameters() if p.requires_grad]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert len(set(a["ids"])) == 3 and set(a["ids"]) <= {r["id"] for r in rows} and len(a["objective_history"]) == 2
    b = worst_case_forget_set(fresh(), base.tokenizer, rows, s)
    assert a["ids"] == b["ids"] and a["objective_history"] == b["objective_history"]
