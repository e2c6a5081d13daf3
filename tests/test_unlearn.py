"""Approximate unlearning: each loss and the NGDiff step against values computed by hand, GeN's
safeguards, and `sift unlearn` end to end on the tiny model (approximate, deterministic, never
touching the workspace; its cached monolithic adapter is deleted by an exact forget)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from sift.errors import SiftError
from sift.exact.forget import forget
from sift.merge.driver import served_hashes
from sift.unlearn.ngdiff import GenSchedule, ngdiff_direction, parabola_step
from sift.unlearn.objectives import answer_logprobs, ga_loss, graddiff_loss, npo_loss, simnpo_loss, token_nll
from sift.unlearn.run import UNLEARN_META, UnlearnSettings, unlearn
from sift.workspace import Workspace

from test_cli import one_error_line, sift


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_answer_logprobs_sum_answer_tokens_only():
    class Fixed(torch.nn.Module):  # logits that do not depend on the input: easy to score by hand
        def forward(self, input_ids, attention_mask):
            logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)]).expand(input_ids.shape[0], input_ids.shape[1], 3)
            return type("Out", (), {"logits": logits})()

    ids = torch.tensor([[0, 1, 2, 0], [0, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, 1, 2, -100], [-100, 2, 0, -100]])
    lp, n = answer_logprobs(Fixed(), (ids, mask, labels))
    p = torch.tensor([1.0, 2.0, 5.0]) / 8.0
    assert n.tolist() == [2, 2]
    torch.testing.assert_close(lp, torch.log(torch.stack([p[1] * p[2], p[2] * p[0]])))
    torch.testing.assert_close(token_nll(lp, n), -(lp.sum()) / 4)


def test_losses_match_hand_computed_values():
    nll_f, nll_r = torch.tensor(2.0), torch.tensor(0.5)
    assert ga_loss(nll_f).item() == -2.0
    assert graddiff_loss(nll_f, nll_r, forget_weight=1.0, retain_weight=2.0).item() == -2.0 + 1.0
    lp, ref = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0])
    beta = 0.1
    want = -(2 / beta) * (log_sigmoid(-beta * (-1.0)) + log_sigmoid(-beta * 1.0)) / 2
    assert npo_loss(lp, ref, beta).item() == pytest.approx(want, rel=1e-6)
    lengths = torch.tensor([3, 1])
    beta, gamma = 4.5, 0.5
    want = -(2 / beta) * (log_sigmoid(-(beta / 3) * -3.0 - gamma) + log_sigmoid(-(beta / 1) * -1.0 - gamma)) / 2
    assert simnpo_loss(lp, lengths, beta, gamma).item() == pytest.approx(want, rel=1e-6)


def test_npo_gradient_tends_to_gradient_ascent_as_beta_vanishes():
    lp = torch.tensor([-3.0, -1.0], requires_grad=True)
    npo_loss(lp, torch.tensor([-3.0, -1.0]), beta=1e-6).backward()
    # d/d logp of -(2/beta) log sigmoid(-beta (logp - ref)) at logp = ref: 2 sigmoid(0) / 2 rows = 0.5
    torch.testing.assert_close(lp.grad, torch.tensor([0.5, 0.5]))


def test_ngdiff_direction_is_the_difference_of_global_unit_gradients():
    g_r = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]  # global norm 5
    g_f = [torch.tensor([0.0, 1.0]), torch.tensor([[0.0]])]  # global norm 1
    d = ngdiff_direction(g_r, g_f, eps=0.0)
    torch.testing.assert_close(d[0], torch.tensor([0.6, -1.0]))
    torch.testing.assert_close(d[1], torch.tensor([[0.8]]))
    flat = ngdiff_direction(g_r, [torch.zeros(2), torch.zeros(1, 1)])  # a flat forget loss: pure retain descent
    torch.testing.assert_close(flat[0], torch.tensor([0.6, 0.0]))


def test_gen_parabola_and_safeguards():
    # L(theta + t g) = (t - 0.3)^2 ... along the update theta - eta g the minimum sits at eta* = -(-0.3)?
    # take L(t) = 2 (t + 0.3)^2 + 1 with t the displacement along +g: the update -eta g is best at eta = 0.3
    def L(t):
        return 2 * (t + 0.3) ** 2 + 1

    eta = 0.1
    assert parabola_step(eta, L(-eta), L(0.0), L(eta)) == pytest.approx(0.3)
    assert parabola_step(eta, 1.0, 2.0, 1.5) is None  # concave
    assert parabola_step(eta, 2.0, 1.0, 1.5) is None  # the update would climb
    g = GenSchedule(eta=0.1)
    assert g.clipped(0.3) == pytest.approx(0.2)  # clipped to 2 eta
    assert g.update(0.3, good=True) == pytest.approx(0.9 * 0.1 + 0.1 * 0.2)
    before = g.eta
    assert g.update(None, good=False) == pytest.approx(before / 2)
    assert g.update(0.5 * before / 2, good=False) == pytest.approx(before / 4)  # a bad fit halves too
    assert (g.accepted, g.failed) == (1, 2)
    assert [s for s in range(1, 31) if GenSchedule(eta=1.0, every=10).due(s)] == [1, 10, 20, 30]


def test_settings_fill_defaults_and_refuse_what_does_not_apply():
    s = UnlearnSettings(method="simnpo").resolved()
    assert (s.beta, s.gamma, s.forget_weight, s.retain_weight) == (4.5, 0.0, 0.125, 1.0)
    assert UnlearnSettings(method="npo").resolved().beta == 0.1
    assert not UnlearnSettings(method="npo").resolved().uses_retain()
    with pytest.raises(SiftError, match="--beta does not apply to ga"):
        UnlearnSettings(method="ga", beta=1.0).resolved()
    with pytest.raises(SiftError, match="unknown unlearning method"):
        UnlearnSettings(method="rmu").resolved()
    with pytest.raises(SiftError, match="--beta must be > 0"):
        UnlearnSettings(method="npo", beta=0.0).resolved()
    with pytest.raises(SiftError, match="lr must be a positive"):
        UnlearnSettings(method="ga", lr=-1).resolved()


@pytest.mark.parametrize("method", ["ga", "graddiff", "npo", "simnpo", "ngdiff"])
def test_unlearn_runs_and_is_marked_approximate(mono_ws, facts, tmp_path, method):
    ids = [r["id"] for r in facts[:3]]
    served_before = served_hashes(mono_ws.merged_dir)[0]
    rec = unlearn(
        mono_ws,
        ids,
        tmp_path / "out",
        UnlearnSettings(method=method, epochs=2, lr=1e-2, batch_size=2, gen_every=2),
        quiet=True,
    )
    assert rec["approximate"] is True and rec["exact"] is False and rec["forget_rows"] == 3
    assert rec["steps"] == 4 and len(rec["history"]) == 2 and rec["flops_estimate"] > 0
    meta = json.loads((tmp_path / "out" / UNLEARN_META).read_text())
    assert meta["method"] == method and "approximate" in meta["note"]
    before = load_file(str(mono_ws.adapter_dir(0) / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    assert served_hashes(mono_ws.merged_dir)[0] == served_before and not mono_ws.ledger_path.exists()
    if method == "ngdiff":
        assert meta["gen"]["accepted_fits"] + meta["gen"]["failed_fits"] == 3  # steps 1, 2, 4
    if method == "ga":  # ascent raises the forget loss
        assert rec["history"][-1]["forget_nll"] > rec["history"][0]["forget_nll"]


def test_unlearn_is_deterministic(mono_ws, facts, tmp_path):
    ids = [r["id"] for r in facts[:4]]
    for out in ("a", "b"):
        unlearn(
            mono_ws,
            ids,
            tmp_path / out,
            UnlearnSettings(method="npo", epochs=1, batch_size=2, retain_weight=1.0),
            quiet=True,
        )
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_workspace_caches_a_monolithic_adapter_that_forget_deletes(trained_template, facts, tmp_path):
    ws = Workspace(shutil.copytree(trained_template, tmp_path / "ws"))
    ids = [facts[0]["id"]]
    unlearn(ws, ids, tmp_path / "out", UnlearnSettings(method="ga", epochs=1), quiet=True)
    assert (ws.unlearn_dir / "monolithic" / "adapter_model.safetensors").exists()
    forget(ws, ids, quiet=True)
    assert not ws.unlearn_dir.exists(), "the cached adapter learned the forgotten rows"


def test_cli_unlearn_errors_and_output(mono_ws, facts, tmp_path):
    p = sift("unlearn", "-w", str(mono_ws.root), "--method", "ga", "--ids", "nope", "--out", str(tmp_path / "o"))
    assert "not in workspace" in one_error_line(p)
    p = sift(
        "unlearn",
        "-w",
        str(mono_ws.root),
        "--method",
        "ga",
        "--beta",
        "1",
        "--ids",
        facts[0]["id"],
        "--out",
        str(tmp_path / "o"),
    )
    assert "--beta does not apply to ga" in one_error_line(p)
    p = sift(
        "unlearn",
        "-w",
        str(mono_ws.root),
        "--method",
        "ga",
        "--ids",
        facts[0]["id"],
        "--out",
        str(mono_ws.root / "inside"),
    )
    assert "outside the workspace" in one_error_line(p)
    p = sift(
        "unlearn",
        "-w",
        str(mono_ws.root),
        "--method",
        "graddiff",
        "--epochs",
        "1",
        "--ids",
        "-",
        "--out",
        str(tmp_path / "o"),
        stdin=facts[0]["id"] + "\n",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("APPROXIMATE unlearning (graddiff")
