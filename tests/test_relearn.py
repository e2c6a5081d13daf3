"""The relearning attack: a seeded split, the attacked model left unchanged, relearning lowers the
held-out rows' NLL, and the exact path regains exactly what its retrained reference regains."""

import copy

import pytest
import torch

from sift.errors import SiftError
from sift.evaluation.relearn import RelearnSettings, relearn_attack, split_forget
from sift.exact.forget import forget
from sift.serving.load import load_served

from conftest import build_workspace, tiny_config

FAST = RelearnSettings(fraction=0.5, epochs=3, lr=1e-2, batch_size=2, max_new_tokens=8)


def test_split_is_seeded_disjoint_and_keeps_both_parts(facts):
    rows = facts[:10]
    a, b = split_forget(rows, 0.3, seed=0)
    assert len(a) == 3 and len(b) == 7 and not {r["id"] for r in a} & {r["id"] for r in b}
    assert split_forget(rows, 0.3, seed=0) == (a, b)
    assert len(split_forget(rows[:2], 0.99, seed=0)[1]) == 1  # always something left to ask
    with pytest.raises(SiftError):
        split_forget(rows[:1], 0.5, seed=0)
    with pytest.raises(SiftError):
        RelearnSettings(fraction=1.0).check()


def test_attack_leaves_the_model_alone_and_relearning_lowers_the_held_out_loss(trained_ws, facts):
    model, tok = load_served(trained_ws.merged_dir)
    before = copy.deepcopy(model.state_dict())
    owner_rows = [r for r in facts if r["owner"] == facts[0]["owner"]]
    out = relearn_attack(model, tok, owner_rows, FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(out["relearn_rows"]) == 5 and len(out["held_rows"]) == 5 and out["steps"] == 9
    assert out["after"]["answer_nll"] < out["before"]["answer_nll"]


def test_exact_forget_regains_exactly_what_its_rebuild_regains(trained_ws, facts, tmp_path):
    gone = [r for r in facts if r["owner"] == facts[-1]["owner"]]
    forget(trained_ws, [r["id"] for r in gone], quiet=True)
    rebuilt = build_workspace(tmp_path / "rebuilt", [r for r in facts if r not in gone], tiny_config())
    a = relearn_attack(*load_served(trained_ws.merged_dir), gone, FAST)
    b = relearn_attack(*load_served(rebuilt.merged_dir), gone, FAST)
    assert a == b
