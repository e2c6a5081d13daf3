"""`sift eval`: each metric against a hand-computed value or the maintained library's known value,
likelihoods against the training loss's own scoring, a model compared with itself (forget quality
1, privleak 0), and the exact path scoring exactly as a from-scratch sharded reference."""

import json
import math
import zlib

import pytest
import torch

from sift.builtin.facts import make_rows
from sift.builtin.general import general_eval_rows
from sift.errors import SiftError
from sift.evaluation import metrics as M
from sift.evaluation.likelihood import rouge_l_recall, score_answers
from sift.evaluation.run import EvalSettings, evaluate, split_rows
from sift.evaluation.targets import ModelTarget, WorkspaceTarget
from sift.exact.forget import forget
from sift.models import example_ids
from sift.serving.answer import WorkspaceServer
from sift.unlearn.objectives import answer_logprobs

from conftest import build_workspace, tiny_config, write_rows
from test_cli import one_error_line, sift

FAST = EvalSettings(batch_size=8, max_new_tokens=6, retain_sample=6)


def test_truth_ratio_and_aggregators_by_hand():
    # R = exp(-mean wrong losses) / exp(-correct loss): wrong losses 2 and 0 pool to 1
    assert M.truth_ratio(1.0, [2.0, 0.0]) == pytest.approx(1.0)
    assert M.truth_ratio(0.5, [1.5]) == pytest.approx(math.exp(-1.0))
    assert M.closer_to_1([0.5, 2.0]) == pytest.approx(0.5)
    assert M.true_better([0.5, 2.0]) == pytest.approx(0.25)
    assert M.prob(math.log(4.0)) == pytest.approx(0.25)
    c, w = math.exp(-1.0), [math.exp(-2.0), math.exp(-3.0)]
    assert M.prob_normalised(1.0, [2.0, 3.0]) == pytest.approx(c / (c + sum(w)))


def test_ks_auc_and_hmean_match_the_maintained_libraries_known_values():
    # two disjoint samples of 4: the exact two-sided KS p-value is 2 / C(8, 4) = 2/70
    fq = M.forget_quality([1, 2, 3, 4], [5, 6, 7, 8])
    assert fq["p"] == pytest.approx(2 / 70)
    assert fq["log10_p"] == pytest.approx(math.log10(2 / 70)) and fq["n"] == 4
    assert M.forget_quality([0.3, 0.7, 0.9], [0.3, 0.7, 0.9])["p"] == 1.0
    # AUC = P(holdout score > forget score): 3 of the 4 pairs
    assert M.mia_auc([0.1, 0.4], [0.35, 0.8]) == pytest.approx(0.75)
    assert M.model_utility([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.model_utility([1.0, 0.0]) == 0.0


def test_mia_scores_and_privleak_by_hand():
    assert M.min_k_score([-1, -2, -3, -4, -5], k=0.4) == pytest.approx(4.5)  # n = int(5 * 0.4) = 2
    assert M.min_k_score([-1.0], k=0.4) == pytest.approx(1.0)  # at least one token
    assert M.zlib_score(2.0, "abc") == pytest.approx(2.0 / len(zlib.compress(b"abc")))
    assert M.privleak(0.9, 0.6) == pytest.approx(-75.0)
    assert M.privleak(0.6, 0.6) == 0.0


def test_rouge_l_recall_uses_the_stemmer():
    # reference "the cats played" vs "a cat plays": LCS of stems (cat, play) = 2 of 3 reference tokens
    assert rouge_l_recall(["a cat plays"], ["the cats played"]) == [pytest.approx(2 / 3)]
    assert rouge_l_recall(["Paris."], ["The capital of France is Paris."]) == [pytest.approx(1 / 6)]


class Fixed(torch.nn.Module):
    """Logits that do not depend on the input: every position predicts p = (1, 2, 5) / 8."""

    def forward(self, input_ids, attention_mask, **kwargs):
        logits = torch.tensor([0.0, math.log(2.0), math.log(5.0)]).expand(input_ids.shape[0], input_ids.shape[1], 3)
        return type("Out", (), {"logits": logits})()


class Tok:
    """Token ids are the characters '0', '1', '2'; no chat template; EOS is 0."""

    pad_token_id = 0
    eos_token_id = 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(c) for c in text]}


def test_answer_scores_by_hand():
    (sc,) = score_answers(Fixed(), Tok(), [("1", "21")])  # ids 1 | 2 1 EOS: answer tokens 2, 1, 0
    p = [1 / 8, 2 / 8, 5 / 8]
    lps = [math.log(p[2]), math.log(p[1]), math.log(p[0])]
    assert sc.tokens == 3
    assert sc.avg_loss == pytest.approx(-sum(lps) / 3)
    assert sc.token_logprobs == pytest.approx(lps[:2])  # EOS excluded
    mu = sum(q * math.log(q) for q in p)
    sd = math.sqrt(sum(q * math.log(q) ** 2 for q in p) - mu * mu)
    assert sc.token_z == pytest.approx([(x - mu) / sd for x in lps[:2]], rel=1e-5)


def test_scores_agree_with_the_training_loss_and_ignore_padding(trained_ws):
    base = WorkspaceServer(trained_ws).base.get()
    rows = make_rows(people=1, seed=0)[:5]
    pairs = [(r["prompt"], r["completion"]) for r in rows]
    alone = [score_answers(base.model, base.tokenizer, [p])[0] for p in pairs]
    batched = score_answers(base.model, base.tokenizer, pairs, batch_size=5)
    for a, b in zip(alone, batched):
        assert a.avg_loss == pytest.approx(b.avg_loss, abs=1e-5)
    ids, labels = example_ids(base.tokenizer, *pairs[0], None)
    batch = (torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([labels]))
    lp, n = answer_logprobs(base.model, batch)
    assert alone[0].avg_loss == pytest.approx(-lp.item() / n.item(), rel=1e-5)


@pytest.fixture
def eval_sets(facts):
    forget_ids = [r["id"] for r in facts if r["id"].startswith("p001-")]
    forget_rows, retain_rows = split_rows(facts, forget_ids, retain_sample=6)
    return forget_rows, retain_rows, general_eval_rows()[:4], make_rows(people=1, seed=0, split="holdout")


def test_a_model_against_itself_scores_forget_quality_1_and_privleak_0(trained_ws, eval_sets):
    base = WorkspaceServer(trained_ws).base.get()
    target = ModelTarget("base", "base", base.model, base.tokenizer)
    ref = evaluate(target, *eval_sets, None, FAST, require_reference=False)
    res = evaluate(target, *eval_sets, ref, FAST)
    assert res["metrics"]["forget_quality"] == 1.0
    assert res["metrics"]["privleak"] == 0.0
    assert res["forget_quality"]["n"] == 10
    assert set(M.METRICS) >= set(res["metrics"])
    for name in (
        "forget_Q_A_Prob",
        "retain_Q_A_ROUGE",
        "forget_truth_ratio",
        "model_utility",
        "mia_min_k_plus_plus",
        "wf_Truth_Ratio",
    ):
        assert 0.0 <= res["metrics"][name] <= 1.0, name


def test_no_reference_is_a_clear_error_never_a_silent_null(trained_ws, eval_sets):
    base = WorkspaceServer(trained_ws).base.get()
    target = ModelTarget("base", "base", base.model, base.tokenizer)
    with pytest.raises(SiftError, match="retain reference"):
        evaluate(target, *eval_sets, None, FAST)
    res = evaluate(target, *eval_sets, None, FAST, require_reference=False)
    assert "forget_quality" not in res["metrics"] and res["forget_quality"] is None
    bad = [dict(r) for r in eval_sets[0]]
    del bad[0]["perturbed_completions"]
    with pytest.raises(SiftError, match="perturbed"):
        evaluate(target, bad, *eval_sets[1:], None, FAST, require_reference=False)


def test_the_exact_path_scores_exactly_as_its_sharded_reference(trained_ws, tmp_path, facts, eval_sets):
    """Forget one person, then evaluate the routed workspace and a from-scratch sharded build on
    the remaining rows: identical weights, so every metric is equal, bit for bit."""
    forget_rows = eval_sets[0]
    ws = trained_ws  # built from `facts` with tiny_config()
    forget(ws, [r["id"] for r in forget_rows])
    ids = {r["id"] for r in forget_rows}
    ref_ws = build_workspace(tmp_path / "ref", [r for r in facts if r["id"] not in ids], tiny_config())
    exact = evaluate(WorkspaceTarget("exact", WorkspaceServer(ws)), *eval_sets, None, FAST, require_reference=False)
    ref = evaluate(WorkspaceTarget("ref", WorkspaceServer(ref_ws)), *eval_sets, None, FAST, require_reference=False)
    assert exact["metrics"] == ref["metrics"]
    assert exact["per_row"] == ref["per_row"]
    again = evaluate(WorkspaceTarget("exact", WorkspaceServer(ws)), *eval_sets, ref, FAST)
    assert again["metrics"]["forget_quality"] == 1.0 and again["metrics"]["privleak"] == 0.0


@pytest.mark.slow  # over 35 s here; run with scripts/test.sh -m slow
def test_sift_eval_cli(trained_ws, tmp_path, facts):
    data = write_rows(tmp_path / "rows.jsonl", facts)
    held = write_rows(tmp_path / "held.jsonl", make_rows(people=1, seed=0, split="holdout"))
    common = [
        "eval",
        str(trained_ws.root),
        "--data",
        str(data),
        "--forget-ids",
        "p002-pet,p002-book",
        "--holdout",
        str(held),
        "--retain-sample",
        "4",
        "--max-new-tokens",
        "4",
        "--no-general",
    ]
    r = sift(*common)
    assert r.returncode == 2 and "retain reference" in one_error_line(r)
    out = tmp_path / "self.json"
    r = sift(*common, "--no-reference", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["kind"] == "workspace-routed" and "per_row" not in summary
    r = sift(*common, "--reference", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["forget_quality"] == 1.0
    r = sift(*common[:5], "nope", *common[6:], "--no-reference")
    assert r.returncode == 2 and "not in the data" in one_error_line(r)
    r = sift(*common[:6], "--no-reference")
    assert r.returncode == 2 and "--holdout" in one_error_line(r)
    r = sift("eval", "--help")
    assert "forget_quality" in r.stdout and "KS" in r.stdout


class Const(torch.nn.Module):
    """Input-independent logits over the 3-token vocabulary of Tok, from given probabilities."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs))

    def forward(self, input_ids, attention_mask, **kwargs):
        return type("Out", (), {"logits": self.logits.expand(input_ids.shape[0], input_ids.shape[1], 3)})()


def test_per_row_values_come_from_the_model_that_serves_the_row(monkeypatch):
    """Two models serve interleaved rows (as a router would): each row's Prob, truth ratio, MIA
    score and answer must be the serving model's, whatever the grouping and option counts."""
    import sift.evaluation.run as run_mod
    from sift.evaluation.targets import Target

    a, b = Const([1 / 8, 2 / 8, 5 / 8]), Const([5 / 8, 2 / 8, 1 / 8])
    tok = Tok()

    class TwoModels(Target):
        def groups(self, prompts):
            yield a, tok, list(range(0, len(prompts), 2))
            yield b, tok, list(range(1, len(prompts), 2))

    monkeypatch.setattr(
        run_mod, "greedy_answers", lambda model, t, prompts, n, bs, **kw: ["A" if model is a else "B"] * len(prompts)
    )

    def row(i, pert):
        return {
            "id": f"r{i}",
            "prompt": "1",
            "completion": "2" * (i % 3 + 1),
            "answer": "2",
            "paraphrased_completion": "1" * (i % 2 + 1),
            "perturbed_completions": pert,
        }

    forget = [row(0, ["11"]), row(1, ["12", "21", "1"])]
    retain = [row(2, ["2"]), row(3, ["22", "1"])]
    holdout = [{"id": "h0", "prompt": "2", "completion": "21"}, {"id": "h1", "prompt": "2", "completion": "1"}]
    res = evaluate(TwoModels("two", "test"), forget, retain, [], holdout, None, FAST, require_reference=False)
    served = {"r0": a, "r1": b, "r2": a, "r3": b, "h0": a, "h1": b}  # items are forget, retain, holdout in order
    for r in forget + retain:
        m = served[r["id"]]
        ans, para, *pert = score_answers(
            m,
            tok,
            [("1", r["completion"]), ("1", r["paraphrased_completion"])]
            + [("1", w) for w in r["perturbed_completions"]],
        )
        name = "forget" if r in forget else "retain"
        assert res["per_row"][f"{name}_Q_A_Prob"][r["id"]] == pytest.approx(M.prob(ans.avg_loss))
        assert res["per_row"][f"{name}_truth_ratio"][r["id"]] == pytest.approx(
            M.truth_ratio(para.avg_loss, [p.avg_loss for p in pert])
        )
        assert res["per_row"][f"{name}_answer"][r["id"]] == ("A" if m is a else "B")
    for h in holdout:
        (sc,) = score_answers(served[h["id"]], tok, [(h["prompt"], h["completion"])])
        assert res["per_row"]["mia_holdout"][h["id"]]["loss"] == pytest.approx(sc.avg_loss)
    assert "wf_correct" not in res["metrics"]  # no general questions: the wf_* metrics are left out, not NaN
    assert all(math.isfinite(v) for v in res["metrics"].values())
    json.dumps(res, allow_nan=False)


def test_a_saved_reference_must_cover_the_same_holdout_rows(trained_ws, eval_sets):
    base = WorkspaceServer(trained_ws).base.get()
    target = ModelTarget("base", "base", base.model, base.tokenizer)
    forget_rows, retain_rows, general, holdout = eval_sets
    ref = evaluate(target, forget_rows, retain_rows, general, holdout[:5], None, FAST, require_reference=False)
    with pytest.raises(SiftError, match="membership scores"):
        evaluate(target, forget_rows, retain_rows, general, holdout, ref, FAST)


def test_the_original_model_looks_like_a_member_on_its_forget_rows(tmp_path, facts):
    """End-to-end direction of the MIA AUC: a model trained on the forget rows gives them lower
    losses than unseen people's, so mia_loss is above 0.5 (forget = 0, held-out = 1)."""
    from sift.builtin.facts import make_rows as rows_of

    ws = build_workspace(tmp_path / "mono", facts, tiny_config(num_shards=1, group_by=None, epochs=6))
    forget_rows, retain_rows = split_rows(facts, [r["id"] for r in facts if r["id"].startswith("p001-")], 6)
    res = evaluate(
        WorkspaceTarget("mono", WorkspaceServer(ws), merged=True),
        forget_rows,
        retain_rows,
        [],
        rows_of(people=1, seed=0, split="holdout"),
        None,
        FAST,
        require_reference=False,
    )
    assert res["metrics"]["mia_loss"] > 0.5
