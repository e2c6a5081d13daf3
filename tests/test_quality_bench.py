"""The quality benchmark's scoring and its script, end to end on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sift.builtin.general import GENERAL_QUESTIONS, general_rows
from sift.evaluation.recall import fact_recall, general_correct, general_recall

ROOT = Path(__file__).resolve().parent.parent

# the rows each router adds to a workspace's table (LoRA and SIFT-Masks alike)
ROUTED_PATHS = (
    "routed: owner's shard (oracle, group given)",
    "routed: keys router (no group id)",
    "merged: what the keys router leaves unclaimed",
    "routed: embed router (no group id)",
    "merged: what the embed router leaves unclaimed",
    "routed: keys router, base answers the unclaimed",
    "routed: embed router, base answers the unclaimed",
)


def test_general_set_is_well_formed_and_names_no_invented_person():
    from sift.builtin.facts import make_rows

    ids = [i for i, _, _ in GENERAL_QUESTIONS]
    assert len(ids) == len(set(ids)) >= 20
    assert all(acc and all(a.strip() for a in acc) for _, _, acc in GENERAL_QUESTIONS)
    owners = {r["owner"].lower() for r in make_rows(people=32)}
    assert not any(o in q.lower() for _, q, _ in GENERAL_QUESTIONS for o in owners)
    assert [r["prompt"] for r in general_rows()] == [q for _, q, _ in GENERAL_QUESTIONS]


def test_general_answers_match_whole_words_only():
    assert general_correct("The capital of France is Paris.", ["paris"])
    assert not general_correct("The freezing point is -18.0 C", ["0", "zero"])
    assert not general_correct("365 * 12 = 312 months", ["12 month"])  # parts of words never count
    assert not general_correct("Parisian food", ["paris"])
    assert general_correct("It is H2O.", ["h2o"])
    rows = [{"answers": ["paris"]}, {"answers": ["tokyo"]}]
    assert general_recall(["Paris!", "Kyoto"], rows) == {"n": 2, "correct": 0.5}


def test_fact_recall_on_paraphrases_accepts_either_full_sentence():
    row = {
        "completion": "Ann was born in Oslo.",
        "paraphrased_completion": "Oslo is the birthplace of Ann.",
        "answer": "Oslo",
    }
    assert fact_recall(["Oslo is the birthplace of Ann."], [row], paraphrased=True)["exact"] == 1.0
    assert fact_recall(["Oslo is the birthplace of Ann."], [row])["exact"] == 0.0
    assert fact_recall(["She was born in Oslo"], [row], paraphrased=True) == {"n": 1, "exact": 0.0, "contains": 1.0}


def bench_quality_argv(workdir: Path, *extra: str) -> list[str]:
    """The quality script on the tiny model: 3 people in 2 shards, one epoch, `extra` on top."""
    common = ["--model", "builtin-tiny", "--people", "3", "--shards", "2", "--epochs", "1"]
    return [
        sys.executable,
        str(ROOT / "scripts" / "bench_quality.py"),
        *common,
        *extra,
        "--workdir",
        str(workdir),
        "--json",
    ]


def test_bench_quality_runs_and_keys_routing_reuses_the_owners_answers(tmp_path):
    argv = bench_quality_argv(tmp_path / "bq", "--max-new-tokens", "3", "--scales", "0.5,1")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout)
    paths = [(r["S"], r["path"]) for r in report["results"]]
    assert paths[:2] == [(0, "base model, untrained"), (1, "monolithic adapter (all rows)")]
    by = {r["path"]: r for r in report["results"] if r["S"] == 2 and r["method"] == "lora"}
    sm = {r["path"]: r for r in report["results"] if r["S"] == 2 and r["method"] == "sift-masks"}
    ta = [p for p in by if p.startswith("merged: task-arithmetic x")]
    assert len(ta) == 1 and by[ta[0]]["scale"] in (0.5, 1.0)
    assert set(by) - set(ta) == {"merged: mean", "merged: ties (density 0.2, lambda 1)", *ROUTED_PATHS}
    base = next(r for r in report["results"] if r["path"] == "base model, untrained")
    assert by["routed: keys router, base answers the unclaimed"]["general"] == base["general"], (
        "keys claims no general question"
    )
    keys, oracle = by["routed: keys router (no group id)"], by["routed: owner's shard (oracle, group given)"]
    # every builtin question names its owner: the keys router finds the owner's shard for all of
    # them, so it serves exactly the oracle's answers; the general questions it leaves to the merged model
    assert keys["route_accuracy"] == {"trained": 1.0, "paraphrased": 1.0}
    assert keys["trained"] == oracle["trained"] and keys["paraphrased"] == oracle["paraphrased"]
    assert keys["unclaimed"] == {"trained": 0, "paraphrased": 0, "general": len(GENERAL_QUESTIONS)}
    assert keys["router_bytes_per_shard"] > 0 and by["routed: embed router (no group id)"]["router_bytes_per_shard"] > 0
    assert (tmp_path / "bq" / "answers.json").exists() and (tmp_path / "bq" / "results.json").exists()
    variants = {"sift-masks: ": "sum/T", "sift-masks-coordinate: ": "sum/count"}
    assert set(sm) == {"sift-masks: each shard alone (base + tau_c, owner's questions)"} | {
        label + path
        for label, formula in variants.items()
        for path in (f"merged, no mask (base + {formula})", *ROUTED_PATHS)
    }
    # the masked shard answers the keys router picks are the oracle's; stored bytes are reported
    for label in variants:
        assert (
            sm[f"{label}routed: keys router (no group id)"]["trained"]
            == sm[f"{label}routed: owner's shard (oracle, group given)"]["trained"]
        )
    assert 0 < sm["sift-masks: merged, no mask (base + sum/T)"]["mask_density"] <= 1
    assert all(r["stored_bytes_per_shard"] > 0 for r in list(by.values()) + list(sm.values()))


@pytest.mark.slow  # over 10 s on 2 cores; keeps the default run under 10 minutes
def test_bench_quality_measures_the_lora_form_of_sift_masks(tmp_path):
    """--mask-form lora: the same rows for sift-masks-lora and its per-coordinate variant, at the
    rank and target weights asked for; a resumed --workdir refuses another recipe."""
    extra = ["--max-new-tokens", "2", "--methods", "sift-masks", "--mask-form", "lora", "--routers", "keys"]
    argv = bench_quality_argv(tmp_path / "bq", *extra, "--lora-r", "4", "--mask-targets", "down_proj,up_proj")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    from sift.workspace.layout import Workspace

    cfg = Workspace(tmp_path / "bq" / "ws-S2-sift-masks-lora-form").load_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.sift_masks.target_modules) == (4, 8.0, ["down_proj", "up_proj"])
    paths = {r["path"] for r in json.loads(p.stdout)["results"] if r["S"] == 2}
    argv = bench_quality_argv(tmp_path / "bq", *extra, "--lora-r", "8", "--mask-targets", "down_proj,up_proj")
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "another recipe (lora_r: 4 -> 8" in again.stderr, again.stderr[-500:]
    (tmp_path / "bq" / "recipe.json").unlink()  # a folder from before the check: its recipe is unknown
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "no recipe.json" in again.stderr, again.stderr[-500:]
    assert "sift-masks (LoRA form): each shard alone (base + tau_c, owner's questions)" in paths
    for label, formula in {"sift-masks-lora: ": "sum/T", "sift-masks-lora-coordinate: ": "sum/count"}.items():
        assert f"{label}merged, no mask (base + {formula})" in paths
        assert f"{label}routed: keys router (no group id)" in paths


def test_bench_routing_builds_the_routers_as_training_does_and_reports_each(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_routing.py"),
            "--model",
            "builtin-tiny",
            "--people",
            "4",
            "--shards",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r["router"]: r for r in json.loads(p.stdout)}
    assert set(rows) == {"keys", "embed (excess)", "embed (late)"}
    keys = rows["keys"]  # every builtin question names its owner; no general question names anyone
    assert keys["trained_to_owner"] == keys["paraphrased_to_owner"] == 1.0 and keys["general_claimed"] == 0.0
    assert rows["embed (late)"]["general_claimed"] == 1.0  # the plain score claims every request
    excess = rows["embed (excess)"]
    assert excess["trained_to_owner"] == 1.0  # a trained prompt scores its full self-score
    assert excess["threshold"] == 0.25 and excess["paraphrase_lowest_ratio"] >= 0
