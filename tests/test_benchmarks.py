"""TOFU and MUSE read as sift rows from local copies with the hub's schemas (tests/benchmark_fixtures.py):
the author derivation, the forget and retain split boundaries, the tables each evaluation reads,
and the errors a wrong copy gets."""

from __future__ import annotations

import pytest
from benchmark_fixtures import tofu_qa

from sift.benchmarks import is_spec, load_spec, muse, tofu
from sift.data import load_records
from sift.errors import SiftError


def test_tofu_authors_come_from_the_row_position(tofu_dir):
    full = tofu.load("full", str(tofu_dir))
    assert len(full) == 4000 and len({r["id"] for r in full}) == 4000
    for i in (0, 19, 20, 3999):
        a, q = divmod(i, 20)
        assert full[i]["id"] == f"tofu-{a:03d}-{q:02d}" and full[i]["author"] == f"tofu-author-{a:03d}"
        assert full[i]["prompt"] == tofu_qa(a, q)["question"]  # the text names its author: the derivation is right
    assert len({r["author"] for r in full}) == 200


@pytest.mark.parametrize(
    ("forget", "retain", "authors"),
    [("forget01", "retain99", 2), ("forget05", "retain95", 10), ("forget10", "retain90", 20)],
)
def test_tofu_forget_and_retain_splits_partition_full_by_author(tofu_dir, forget, retain, authors):
    full = {r["id"]: r for r in tofu.load("full", str(tofu_dir))}
    f, r = tofu.load(forget, str(tofu_dir)), tofu.load(retain, str(tofu_dir))
    assert len(f) == 20 * authors and len(r) == 4000 - 20 * authors
    fid, rid = {x["id"] for x in f}, {x["id"] for x in r}
    assert not fid & rid and fid | rid == set(full)
    assert {x["author"] for x in f} == {f"tofu-author-{a:03d}" for a in range(200 - authors, 200)}
    assert not {x["author"] for x in f} & {x["author"] for x in r}  # whole authors on each side
    for x in f + r:  # the same row under the same id in every config
        assert (x["prompt"], x["completion"]) == (full[x["id"]]["prompt"], full[x["id"]]["completion"])
    pert = tofu.load(f"{forget}_perturbed", str(tofu_dir))
    assert [x["id"] for x in pert] == [x["id"] for x in f]
    assert all(len(x["perturbed_completions"]) == 5 and x["paraphrased_completion"] for x in pert)
    held = tofu.load(f"holdout{forget[-2:]}", str(tofu_dir))
    assert not {x["id"] for x in held} & set(full) and all("holdout" in x["author"] for x in held)


def test_tofu_eval_sets_are_open_unlearnings(tofu_dir):
    sets = tofu.eval_sets("forget05", str(tofu_dir))
    assert len(sets.forget) == 200 and sets.forget[0]["id"] == "tofu-190-00"
    assert len(sets.retain) == 400 and sets.retain[-1]["id"] == "tofu-019-19"  # retain_perturbed: the first 20 authors
    assert (len(sets.ra), len(sets.wf)) == (100, 117)
    assert all(len(r["perturbed_completions"]) == 3 and r["answers"] == [r["completion"]] for r in sets.ra + sets.wf)
    assert len(sets.holdout) == 200


def test_benchmark_tables_load_wherever_data_does(tofu_dir, muse_dir):
    assert is_spec("tofu:forget10") and is_spec(f"muse-news:raw/forget@{muse_dir}") and not is_spec("rows.jsonl")
    assert len(load_records(f"tofu:forget01@{tofu_dir}")) == 40
    rows = load_records(f"muse-news:raw/forget@{muse_dir}")
    assert rows[0] == {
        "id": "muse-news-raw-forget-0000",
        "document": "muse-news-raw-forget-0000",
        "text": rows[0]["text"],
    }
    qa = load_spec(f"muse-news:knowmem/retain_qa_icl@{muse_dir}")
    assert set(qa[0]) == {"id", "prompt", "completion"} and len(qa) == 2
    verb = muse.load("muse-news", "verbmem/forget", str(muse_dir))
    assert set(verb[0]) == {"id", "prompt", "gt"}


def test_a_wrong_copy_is_refused_by_name(tofu_dir, tmp_path):
    import shutil

    with pytest.raises(SiftError, match="no config 'forget20'"):
        tofu.load("forget20", str(tofu_dir))
    with pytest.raises(SiftError, match="holds no table full/train"):
        tofu.load("full", str(tmp_path))
    short = tmp_path / "short"
    short.mkdir()
    import datasets

    datasets.Dataset.from_list([tofu_qa(0, q) for q in range(30)]).to_parquet(str(short / "forget01.parquet"))
    with pytest.raises(SiftError, match="30 rows; TOFU's forget01 holds 2 authors"):
        tofu.load("forget01", str(short))
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 40).to_parquet(
        str(short / "forget01_perturbed.parquet")
    )
    with pytest.raises(SiftError, match="missing column.*paraphrased_answer"):
        tofu.load("forget01_perturbed", str(short))
    with pytest.raises(SiftError, match="MUSE has no table 'raw/forget3'"):
        muse.load("muse-news", "raw/forget3", str(tmp_path))
    with pytest.raises(SiftError, match="TOFU's forget split is one of"):
        tofu.eval_sets("forget07", str(tofu_dir))
    shutil.rmtree(short)


def test_train_on_tofu_and_forget_an_author_exactly(tofu_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from sift.cli import app

    ws = str(tmp_path / "ws")
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "train-shards",
            "-w",
            ws,
            "--data",
            f"tofu:forget01@{tofu_dir}",
            "--group-by",
            "author",
            "--num-shards",
            "2",
            "--model",
            "builtin-tiny",
            "--epochs",
            "1",
        ],
    )
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["merge", "-w", ws])
    assert r.exit_code == 0, r.stderr
    r = runner.invoke(app, ["forget", "-w", ws, "--group", "tofu-author-199", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["rows_removed"] == 20
    r = runner.invoke(app, ["verify", "-w", ws, "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["identical"] is True
