"""The stronger approximate methods' defining computations (WAGLE's attribution score and mask,
the SAM perturbation, the l1 term and its schedule, pruning, the coreset) against values worked
out by hand, and each one end to end on the tiny model."""

import math

import pytest
import torch
from safetensors.torch import load_file

from sift.errors import SiftError
from sift.unlearn.masks import apply_masks, magnitude_scores, top_fraction, wagle_scores
from sift.unlearn.run import UnlearnSettings, coreset_rows, unlearn
from sift.unlearn.smoothing import sam_forget_backward, sam_perturbation
from sift.unlearn.sparsity import l1_penalty, l1_weight, prune_by_magnitude


def test_wagle_score_is_the_closed_form():
    p = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5]])]
    gf = [torch.tensor([3.0, 1.0]), torch.tensor([[-4.0]])]
    gr = [torch.tensor([1e-6, -2e-6]), torch.tensor([[0.0]])]
    s = wagle_scores(p, gf, gr, gamma=1e-6)
    # |(theta - g_r / gamma) * g_f|: (1 - 1) * 3 = 0, (-2 + 2) * 1 = 0, (0.5 - 0) * -4 -> 2
    assert torch.allclose(s[0], torch.tensor([0.0, 0.0], dtype=torch.float64)) and float(s[1]) == 2.0
    s = wagle_scores(p, gf, [torch.zeros(2), torch.zeros(1, 1)], gamma=1e-6)  # no retain gradient: SNIP's |theta g_f|
    assert s[0].tolist() == [3.0, 2.0] and float(s[1]) == 2.0


def test_top_fraction_is_global_exact_and_stable():
    scores = [torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64), torch.tensor([[4.0, 3.0]], dtype=torch.float64)]
    m = top_fraction(scores, 0.4)  # 2 of 5, over both tensors together
    assert m[0].tolist() == [True, False, False] and m[1].tolist() == [[True, False]]
    m = top_fraction(scores, 0.6)  # 3 of 5: the tie at 3.0 goes to the earlier position
    assert m[0].tolist() == [True, False, True] and m[1].tolist() == [[True, False]]
    assert sum(int(x.sum()) for x in top_fraction(scores, 1.0)) == 5
    with pytest.raises(ValueError):
        top_fraction(scores, 0.0)
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    apply_masks([w], [torch.tensor([True, False, True])])
    assert w.grad.tolist() == [1.0, 0.0, 3.0]
    assert [t.tolist() for t in magnitude_scores([torch.tensor([-2.0, 1.0])])] == [[2.0, 1.0]]


def test_sam_perturbation_has_radius_rho_along_the_global_gradient():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    d = sam_perturbation(g, 0.5)
    assert torch.allclose(d[0], torch.tensor([0.3, 0.0])) and torch.allclose(d[1], torch.tensor([[0.4]]))
    assert math.isclose(math.sqrt(sum(float((x**2).sum()) for x in d)), 0.5, rel_tol=1e-6)


def test_sam_backward_takes_the_forget_gradient_at_the_perturbed_point():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    v = torch.nn.Parameter(torch.tensor([-1.0], dtype=torch.float64))

    def loss():  # f = sum w^3 + v^2: gradient (3 w^2, 2 v)
        return (w**3).sum() + (v**2).sum()

    value = sam_forget_backward([w, v], loss, rho=0.1)
    g = torch.tensor([3.0, 12.0, -2.0], dtype=torch.float64)
    delta = 0.1 * g / g.norm()
    at = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64) + delta
    assert value == pytest.approx(1 + 8 + 1)
    assert torch.allclose(w.grad, 3 * at[:2] ** 2) and torch.allclose(v.grad, 2 * at[2:])
    assert w.detach().tolist() == [1.0, 2.0] and v.detach().tolist() == [-1.0]  # back at theta


def test_l1_schedule_penalty_and_pruning():
    assert [l1_weight(1e-3, e, 4) for e in (1, 2, 3, 4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    p = torch.nn.Parameter(torch.tensor([0.5, -2.0, 0.0, 1.0]))
    l1_penalty([p]).backward()
    assert p.grad.tolist() == [1.0, -1.0, 0.0, 1.0]  # the l1 term pushes each weight toward zero
    q = torch.nn.Parameter(torch.tensor([0.5, -2.0, 0.1, 1.0]))
    keep = prune_by_magnitude([q], 0.5)
    assert q.detach().tolist() == [0.0, -2.0, 0.0, 1.0] and keep[0].tolist() == [False, True, False, True]


def test_coreset_is_a_seeded_subset():
    from sift.data import Row

    rows = [Row(id=f"r{i}", group=f"r{i}", prompt="q", completion="a", text=None, record={}) for i in range(20)]
    a = coreset_rows(rows, 0.1, seed=0)
    assert len(a) == 2 and set(r.id for r in a) <= {r.id for r in rows}
    assert [r.id for r in a] == [r.id for r in coreset_rows(rows, 0.1, seed=0)]
    assert len(coreset_rows(rows, 0.01, seed=0)) == 1


def test_settings_refuse_what_does_not_apply():
    with pytest.raises(SiftError, match="apply to"):
        UnlearnSettings(method="ngdiff", sam_rho=0.01).resolved()
    with pytest.raises(SiftError, match="needs --mask"):
        UnlearnSettings(method="npo", mask_ratio=0.5).resolved()
    with pytest.raises(SiftError, match="unknown --mask"):
        UnlearnSettings(method="npo", mask="snip").resolved()
    with pytest.raises(SiftError, match="has none"):
        UnlearnSettings(method="l1sparse", sam_rho=0.01).resolved()
    assert UnlearnSettings(method="l1sparse").resolved().l1 == 1e-4
    assert UnlearnSettings(method="graddiff", mask="wagle").resolved().mask_ratio == 0.8


def _run(ws, facts, out, **kw):
    ids = [r["id"] for r in facts[:4]]
    s = UnlearnSettings(epochs=2, lr=1e-2, batch_size=2, **kw)
    rec = unlearn(ws, ids, out, s, quiet=True)
    return rec, load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("mask", ["wagle", "magnitude", "random"])
def test_a_mask_moves_only_its_fraction_of_the_weights(mono_ws, facts, tmp_path, mask):
    before = load_file(str(mono_ws.adapter_dir(0) / "adapter_model.safetensors"))
    rec, after = _run(mono_ws, facts, tmp_path / "out", method="graddiff", mask=mask, mask_ratio=0.25)
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    assert 0 < changed <= round(0.25 * total) and rec["mask"]["fraction_updated"] == pytest.approx(0.25, abs=1e-6)


def test_wagle_mask_differs_from_its_controls_and_npo_takes_it(mono_ws, facts, tmp_path):
    _, wagle = _run(mono_ws, facts, tmp_path / "w", method="npo", mask="wagle", mask_ratio=0.25)
    _, magn = _run(mono_ws, facts, tmp_path / "m", method="npo", mask="magnitude", mask_ratio=0.25)
    assert any(not torch.equal(wagle[k], magn[k]) for k in wagle)


def test_sam_and_pruning_and_l1sparse_and_coreset_end_to_end(mono_ws, facts, tmp_path):
    _, plain = _run(mono_ws, facts, tmp_path / "plain", method="npo")
    rec, sam = _run(mono_ws, facts, tmp_path / "sam", method="npo", sam_rho=0.01)
    assert rec["settings"]["sam_rho"] == 0.01 and any(not torch.equal(plain[k], sam[k]) for k in plain)
    rec, pruned = _run(mono_ws, facts, tmp_path / "pruned", method="graddiff", prune=0.5)
    zeros = sum(int((v == 0).sum()) for v in pruned.values())
    assert zeros >= 0.5 * sum(v.numel() for v in pruned.values()) - 1  # pruned weights stayed at zero
    rec, _ = _run(mono_ws, facts, tmp_path / "l1", method="l1sparse")
    assert rec["settings"]["l1"] == 1e-4 and rec["steps"] == 4
    rec, _ = _run(mono_ws, facts, tmp_path / "core", method="ga", coreset=0.5)
    assert rec["forget_rows"] == 4 and rec["unlearned_rows"] == 2 and rec["steps"] == 2
