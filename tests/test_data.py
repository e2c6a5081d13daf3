import json

import pytest

from sift.config import DataConfig
from sift.data import load_records, parse_ids, parse_rows
from sift.errors import SiftError


def _parse(records, **kw):
    return parse_rows(records, DataConfig(**kw), source="rows")


def test_missing_id_column():
    with pytest.raises(SiftError, match="missing id column 'id'"):
        _parse([{"text": "x"}])


def test_ids_must_be_strings_or_integers():
    with pytest.raises(SiftError, match="id column 'id' must hold a string or an integer, got float"):
        _parse([{"id": 1.5, "text": "x"}])
    with pytest.raises(SiftError, match="empty id"):
        _parse([{"id": " ", "text": "x"}])


def test_duplicate_ids_are_listed():
    with pytest.raises(SiftError, match=r"duplicate ids \(2\): '1', 'b'"):
        _parse([{"id": 1, "text": "x"}, {"id": "1", "text": "y"}, {"id": "b", "text": "z"}, {"id": "b", "text": "w"}])


def test_needs_text_or_prompt_and_completion():
    with pytest.raises(SiftError, match="needs 'text', or 'prompt' and 'completion'"):
        _parse([{"id": 1, "prompt": "q"}])
    with pytest.raises(SiftError, match="has both"):
        _parse([{"id": 1, "text": "t", "prompt": "q", "completion": "a"}])
    with pytest.raises(SiftError, match="must be a string"):
        _parse([{"id": 1, "text": 5}])
    with pytest.raises(SiftError, match="empty text"):
        _parse([{"id": 1, "prompt": "q", "completion": ""}])


def test_group_column_required_when_grouping():
    with pytest.raises(SiftError, match="missing group column 'owner'"):
        _parse([{"id": 1, "text": "t"}], group_by="owner")


def test_custom_id_column_and_int_ids():
    rows = _parse([{"key": 7, "text": "t"}, {"key": "a", "text": "u"}], id_column="key")
    assert [r.id for r in rows] == ["7", "a"]
    assert rows[0].record["key"] == "7"


def test_empty_and_bad_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(SiftError, match="is empty"):
        load_records(str(empty))
    blank = tmp_path / "b.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(SiftError, match="holds no rows"):
        load_records(str(blank))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": \n')
    with pytest.raises(SiftError, match=r"bad.jsonl:2: not valid JSON"):
        load_records(str(bad))
    with pytest.raises(SiftError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SiftError, match="cannot tell the format"):
        other = tmp_path / "rows.txt"
        other.write_text("x")
        load_records(str(other))


def test_csv_and_parquet_through_datasets(tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("id,prompt,completion\n1,q1,a1\n2,q2,a2\n")
    rows = _parse(load_records(str(csv)))
    assert [(r.id, r.prompt, r.completion) for r in rows] == [("1", "q1", "a1"), ("2", "q2", "a2")]
    import datasets

    pq = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"id": "x", "text": "hello"}, {"id": "y", "text": "world"}]).to_parquet(str(pq))
    assert [r.text for r in _parse(load_records(str(pq)))] == ["hello", "world"]


def test_parse_ids(tmp_path, monkeypatch):
    assert parse_ids("b, a,,a", None) == ["a", "b"]
    f = tmp_path / "ids.txt"
    f.write_text("x y\n\n  z \n")
    assert parse_ids(None, str(f)) == ["x y", "z"]  # one id per line: ids may hold blanks
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("3\n17\n"))
    assert parse_ids("-", None) == ["17", "3"]
    with pytest.raises(SiftError, match="no ids given"):
        parse_ids(None, None)
    with pytest.raises(SiftError, match="empty"):
        parse_ids(" , ", None)


def test_builtin_facts_are_deterministic_and_complete():
    from sift.builtin.facts import FACT_KINDS, make_rows

    a, b = make_rows(people=5, seed=3), make_rows(people=5, seed=3)
    assert json.dumps(a) == json.dumps(b)
    assert len(a) == 5 * len(FACT_KINDS) and len({r["id"] for r in a}) == len(a)
    assert make_rows(people=5, seed=4) != a
    hold = make_rows(people=5, seed=3, split="holdout")
    assert not {r["owner"] for r in hold} & {r["owner"] for r in a}
    for r in a:
        assert r["answer"] in r["completion"] and len(r["perturbed_completions"]) == 3
        assert all(r["answer"] not in p for p in r["perturbed_completions"])


def test_csv_ids_and_groups_keep_their_leading_zeros(tmp_path):
    """Type inference read the CSV id 007 as the integer 7, so `forget --ids 007` found no row."""
    from sift.data import key_columns

    csv = tmp_path / "rows.csv"
    csv.write_text("id,owner,prompt,completion,n\n007,0042,q1,a1,5\n010,0042,q2,a2,6\n")
    cfg = DataConfig(group_by="owner")
    rows = parse_rows(load_records(str(csv), key_columns=key_columns(cfg)), cfg, source="rows")
    assert [(r.id, r.group) for r in rows] == [("007", "0042"), ("010", "0042")]
    assert rows[0].record["n"] == 5  # other columns keep their types
    import datasets

    pq = tmp_path / "rows.parquet"
    datasets.Dataset.from_list([{"id": "007", "owner": "0042", "text": "hello"}]).to_parquet(str(pq))
    assert [(r.id, r.group) for r in parse_rows(load_records(str(pq), key_columns=key_columns(cfg)), cfg)] == [
        ("007", "0042")
    ]


def test_a_csv_workspace_holds_the_ids_as_written(tmp_path):
    from sift.workspace import Workspace
    from sift.workspace.create import create_workspace
    from sift.workspace.rows import read_manifest

    from conftest import tiny_config

    csv = tmp_path / "rows.csv"
    csv.write_text("id,owner,prompt,completion\n007,ann,q1,a1\n010,bob,q2,a2\n")
    ws = Workspace(tmp_path / "ws")
    create_workspace(ws, str(csv), tiny_config(num_shards=2))
    assert sorted(read_manifest(ws)) == ["007", "010"]


def test_normalize_text_matches_case_accents_and_punctuation():
    from sift.data import normalize_text

    assert normalize_text("  Thési  MORIFOUM!") == normalize_text("thesi morifoum") == "thesi morifoum"
