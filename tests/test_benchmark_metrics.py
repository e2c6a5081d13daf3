"""The metrics behind the published TOFU and MUSE numbers, against hand-computed values and
against open-unlearning's own definitions (locuslab/open-unlearning @ d3d7cf9), and the answer
span that reproduces its preprocessing token for token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sift.evaluation import metrics as M
from sift.evaluation.likelihood import rouge_l_f1, text_logprobs
from sift.evaluation.muse import cut_at_stop
from sift.models import PromptFormat, example_ids, load_base_model, prompt_ids

TINY = 1e-10


def _ou_truth_ratio(correct_losses, wrong_losses, aggregator):
    """open-unlearning's truth_ratio (src/evals/metrics/memorization.py), transcribed: per-sample
    probabilities exp(-avg loss), the wrong answers' losses averaged first."""
    correct = np.exp(-np.asarray(correct_losses))
    wrong = np.exp(-np.mean(np.asarray(wrong_losses), axis=1))
    if aggregator == "prob_mean":
        tr = correct / (correct + wrong + TINY)
        return float(np.mean(tr))
    tr = wrong / (correct + TINY)
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(tr, 1 / (tr + TINY))))
    return float(np.mean(np.maximum(0, 1 - tr)))


def test_truth_ratio_aggregators_match_open_unlearning_and_a_hand_example():
    ln2 = math.log(2)
    correct = [0.0, 0.0, ln2]  # probabilities 1, 1, 1/2
    wrong = [[ln2, ln2], [-ln2, -ln2], [ln2, ln2]]  # 1/2, 2, 1/2 -> R = 0.5, 2, 1
    ratios = [M.truth_ratio(c, w) for c, w in zip(correct, wrong)]
    assert ratios == pytest.approx([0.5, 2.0, 1.0])
    by_hand = {
        "closer_to_1_better": (0.5 + 0.5 + 1.0) / 3,
        "true_better": (0.5 + 0.0 + 0.0) / 3,
        "prob_mean": (1 / 1.5 + 1 / 3 + 1 / 2) / 3,
    }
    for name, agg in M.TRUTH_RATIO_AGGREGATORS.items():
        assert agg(ratios) == pytest.approx(by_hand[name], abs=1e-9), name
        assert agg(ratios) == pytest.approx(_ou_truth_ratio(correct, wrong, name), abs=1e-9), name
    rng = np.random.default_rng(0)
    c, w = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, (50, 5))
    for name, agg in M.TRUTH_RATIO_AGGREGATORS.items():
        mine = agg([M.truth_ratio(a, b) for a, b in zip(c, w)])
        assert mine == pytest.approx(_ou_truth_ratio(c, w, name), rel=1e-9), name


def test_prob_mean_is_monotone_in_r_so_forget_quality_does_not_depend_on_the_aggregator():
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(0, 1, 40), rng.lognormal(0.3, 1, 40)
    p = M.forget_quality(list(a), list(b))["p"]
    assert M.forget_quality(list(1 / (1 + a)), list(1 / (1 + b)))["p"] == pytest.approx(p)
    assert M.forget_quality(list(1 / a), list(1 / b))["p"] == pytest.approx(p)


def test_model_utility_takes_nine_values_with_the_real_authors_set():
    vals = {
        "retain_Q_A_Prob": 0.5,
        "retain_Q_A_ROUGE": 0.4,
        "retain_Truth_Ratio": 0.6,
        "wf_Q_A_Prob_normalised": 0.7,
        "wf_Q_A_ROUGE": 0.8,
        "wf_Truth_Ratio": 0.5,
    }
    six = M.METRICS["model_utility"].compute(M.MetricInputs(values=dict(vals)))
    assert six == pytest.approx(6 / sum(1 / v for v in vals.values()))
    ra = {"ra_Q_A_Prob_normalised": 0.9, "ra_Q_A_ROUGE": 0.3, "ra_Truth_Ratio": 0.6}
    nine = M.METRICS["model_utility"].compute(M.MetricInputs(values={**vals, **ra}))
    assert nine == pytest.approx(9 / sum(1 / v for v in {**vals, **ra}.values()))


def test_muse_metrics_by_hand():
    # ROUGE-L F1: LCS "the cat on the mat" = 5 of 6 tokens on each side
    assert rouge_l_f1(["the cat sat on the mat"], ["the cat is on the mat"]) == [pytest.approx(5 / 6)]
    # precision 2/2, recall 2/4: F1 = 2 * 1 * 0.5 / 1.5
    assert rouge_l_f1(["town hall"], ["the town hall burned"]) == [pytest.approx(2 / 3)]
    # the stemmer: "opened" and "opens" agree only with it
    assert rouge_l_f1(["opened"], ["opens"], stemmer=True) == [1.0]
    assert rouge_l_f1(["opened"], ["opens"], stemmer=False) == [0.0]
    # knowmem answers are cut at open-unlearning's stop strings
    assert cut_at_stop(" The mayor\n\nQuestion: who") == "The mayor"
    assert cut_at_stop("Paris\nQuestion: next") == "Paris"
    # Min-K% (k = 0.4 of 5 tokens: the 2 lowest), its AUC and MUSE's privleak
    assert M.min_k_score([-1.0, -5.0, -0.5, -3.0, -0.1], 0.4) == pytest.approx(4.0)
    forget, holdout = [1.0, 2.0, 3.0, 4.0], [2.5, 3.5, 5.0, 6.0]  # loss-like: forget rows look like members
    auc = M.mia_auc(forget, holdout)  # pairs (f, h) with h > f: 4 + 3 + 3 + 3 of 16
    assert auc == pytest.approx(13 / 16)
    assert M.privleak(auc, 0.5) == pytest.approx(((1 - 13 / 16) - 0.5) / 0.5 * 100)
    assert M.privleak(0.5, 0.5) == 0.0
    # open-unlearning's privleak is MUSE's (AUC - AUC_retrain) / AUC_retrain, AUC_MUSE = 1 - AUC
    assert M.privleak(0.9, 0.6) == pytest.approx(((1 - 0.9) - (1 - 0.6)) / (1 - 0.6) * 100)


@pytest.fixture(scope="module")
def tiny():
    base = load_base_model("builtin-tiny")
    return base.model, base.tokenizer


def test_text_logprobs_are_every_token_after_bos_but_the_last(tiny):
    model, tok = tiny
    texts = ["Story 1: the mayor opened a bridge.", "A much longer story about a town that had a bridge and a mayor."]
    got = text_logprobs(model, tok, texts, batch_size=2)
    for text, lp in zip(texts, got):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        start = max(1, len(tok("", add_special_tokens=True)["input_ids"]))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = [float(logp[j - 1, ids[j]]) for j in range(start, len(ids) - 1)]
        assert len(lp) == len(want)
        np.testing.assert_allclose(lp, want, rtol=1e-4, atol=1e-5)


def _ou_preprocess(tokenizer, template_config, prompt, response):
    """open-unlearning's preprocess_chat_instance (src/data/utils.py @ d3d7cf9), transcribed for
    one exchange without in-context examples: (input ids, labels)."""
    if template_config["apply_chat_template"]:
        chat = []
        if template_config.get("system_prompt"):
            chat += [{"role": "system", "content": template_config["system_prompt"]}]
        chat += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        date = {"date_string": template_config["date_string"]} if template_config.get("date_string") else {}
        chat_ids = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False, **date), add_special_tokens=False)[
            "input_ids"
        ]
        prompt_ids_ = tokenizer(
            tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True, **date),
            add_special_tokens=False,
        )["input_ids"]
    else:
        wrapped = (
            template_config["user_start_tag"]
            + prompt
            + template_config["user_end_tag"]
            + template_config["asst_start_tag"]
        )
        chat_ids = tokenizer(wrapped + response, add_special_tokens=True)["input_ids"]
        prompt_ids_ = tokenizer(wrapped, add_special_tokens=True)["input_ids"]
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids += [tokenizer.eos_token_id]
    return chat_ids, [-100] * len(prompt_ids_) + chat_ids[len(prompt_ids_) :]


QA = [("What is fact 3 of author 7?", "Fact 3 of author 7 is value 220."), ("Who?", "Nobody at all")]
CHAT = {"apply_chat_template": True}
TOFU_TEMPLATE = {
    "apply_chat_template": False,
    "user_start_tag": "Question: ",
    "user_end_tag": "\n",
    "asst_start_tag": "Answer: ",
}


def _check_answer_span(tok):
    for q, a in QA:
        assert example_ids(tok, q, a, None, PromptFormat(answer_span="open-unlearning")) == _ou_preprocess(
            tok, CHAT, q, a
        )
        sys_fmt = PromptFormat(answer_span="open-unlearning", system_prompt="You are a helpful assistant.")
        assert example_ids(tok, q, a, None, sys_fmt) == _ou_preprocess(
            tok, {**CHAT, "system_prompt": "You are a helpful assistant."}, q, a
        )
        assert example_ids(tok, q, a, None, PromptFormat("tofu", "open-unlearning")) == _ou_preprocess(
            tok, TOFU_TEMPLATE, q, a
        )
        # sift's own span: the answer's tokens and EOS after the prompt, what it trains on
        ids, labels = example_ids(tok, q, a, None)
        answer = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == prompt_ids(tok, q) + answer and labels == [-100] * len(prompt_ids(tok, q)) + answer
        assert example_ids(tok, q, a, None, PromptFormat()) == (ids, labels)
        # with ChatML open-unlearning scores the end-of-turn, the newline and EOS: more tokens than sift
        ou_labels = _ou_preprocess(tok, CHAT, q, a)[1]
        assert sum(x != -100 for x in ou_labels) > sum(x != -100 for x in labels)


def test_answer_span_open_unlearning_is_its_preprocessing_on_the_tiny_template(tiny):
    _check_answer_span(tiny[1])


@pytest.mark.slow  # builds the builtin model's cache on a fresh machine
def test_answer_span_open_unlearning_is_its_preprocessing_on_the_builtin_template():
    from sift.models import load_tokenizer

    _check_answer_span(load_tokenizer("builtin"))


def test_date_string_reaches_a_template_that_prints_it(tiny):
    import copy

    tok = copy.deepcopy(tiny[1])
    tok.chat_template = "Today {{ date_string | default('unset') }}\n" + tok.chat_template
    q, a = QA[0]
    fmt = PromptFormat(
        answer_span="open-unlearning", system_prompt="You are a helpful assistant.", date_string="10 Apr 2025"
    )
    ids = example_ids(tok, q, a, None, fmt)
    assert ids == _ou_preprocess(
        tok, {**CHAT, "system_prompt": "You are a helpful assistant.", "date_string": "10 Apr 2025"}, q, a
    )
    assert "10 Apr 2025" in tok.decode(prompt_ids(tok, q, fmt)) and "unset" in tok.decode(prompt_ids(tok, q))


def test_prompt_format_refuses_what_it_does_not_know():
    from sift.errors import SiftError

    for bad in (
        PromptFormat("alpaca"),
        PromptFormat(answer_span="full"),
        PromptFormat("tofu", system_prompt="x"),
        PromptFormat("raw", date_string="1 Jan 2025"),
    ):
        with pytest.raises(SiftError):
            bad.check()


def test_ks_resolution_lists_the_p_values_forget_quality_can_take():
    ps = M.ks_pvalues(10)
    assert len(ps) == 11 and ps[0] == ps[1] == 1.0
    # the three values the embedded default's compare showed are on the list
    for seen in (0.418, 0.787):
        assert any(abs(p - seen) < 5e-4 for p in ps)
    # each is what the test gives on real samples whose ranks differ by that many rows
    rng = np.random.default_rng(0)
    a = rng.normal(size=10)
    b = np.sort(a)
    b[:4] = b[-1] + 1 + np.arange(4)  # four rows move above every other: D = 4/10
    assert M.forget_quality(list(a), list(b))["p"] == pytest.approx(ps[4])
    line = M.ks_resolution(10)
    assert "n = 10" in line and "10 distinct p-values" in line and "1.08e-05" in line
    assert "38 distinct" in M.ks_resolution(40)
    # the floors at TOFU's sizes are the published GradAscent values (every forget row's ratio beyond every reference row's)
    assert M.ks_pvalues(200)[-1] == pytest.approx(1.94e-119, rel=1e-3)  # forget05
    assert M.ks_pvalues(400)[-1] == pytest.approx(1.06e-239, rel=1e-3)  # forget10


def test_every_approximate_method_gets_its_own_style_and_coinciding_points_are_named():
    from sift.evaluation.plots import coinciding, method_style

    assert len({method_style(i) for i in range(182)}) == 182
    assert len({method_style(i)[0] for i in range(14)}) == 14 and len({method_style(i)[1] for i in range(13)}) == 13
    groups = coinciding([("a", 0.5, 0.418), ("b", 0.5001, 0.4181), ("c", 0.6, 0.418), ("d", 0.5, 1.0), ("e", 0.5, 1.0)])
    assert sorted(sorted(g[2]) for g in groups) == [["a", "b"], ["d", "e"]]
