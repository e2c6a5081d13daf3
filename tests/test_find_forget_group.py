"""Deletion requests that name a person: `forget --group` equals forgetting the person's ids,
byte for byte, and `sift find` turns a name or a piece of text into ids for a pipeline."""

from __future__ import annotations

import json
import shutil

import pytest

from sift.errors import SiftError
from sift.exact.forget import forget
from sift.merge.driver import served_hashes
from sift.merge.state import STATE_DIR, sums_sha256
from sift.workspace import Workspace
from sift.workspace.find import find_rows
from sift.workspace.view import WorkspaceView

from conftest import snapshot
from test_cli import sift


def test_forget_by_group_equals_forget_by_its_ids(trained_ws, facts, tmp_path):
    owner = facts[-1]["owner"]
    ids = [r["id"] for r in facts if r["owner"] == owner]
    twin = Workspace(tmp_path / "twin")
    shutil.copytree(trained_ws.root, twin.root)
    by_group = forget(trained_ws, [], groups=[owner.lower().replace(" ", "  ") + "!"], quiet=True)
    by_ids = forget(twin, ids, quiet=True)
    assert by_group["groups"] == {owner.lower().replace(" ", "  ") + "!": len(ids)}
    assert by_group["rows_removed"] == by_ids["rows_removed"] == len(ids)
    assert served_hashes(trained_ws.merged_dir) == served_hashes(twin.merged_dir)
    assert sums_sha256(trained_ws.merged_dir / STATE_DIR) == sums_sha256(twin.merged_dir / STATE_DIR)
    mine, theirs = snapshot(trained_ws.root), snapshot(twin.root)
    differ = {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
    assert differ <= {"ledger.jsonl", "state.json"}  # the record (forget id, times, group hash) only
    entry = trained_ws.read_ledger()[-1]
    assert len(entry["group_hashes"]) == 1 and owner not in json.dumps(entry)
    assert "group_hashes" not in twin.read_ledger()[-1]
    again = forget(trained_ws, [], groups=[owner], quiet=True)
    assert not again["changed"] and again["groups_already_forgotten"] == 1


def test_unknown_groups_are_refused_unless_ignored(trained_ws, facts):
    before = snapshot(trained_ws.root)
    owner = facts[0]["owner"]
    with pytest.raises(SiftError, match="1 group\\(s\\) match no row .*'Nobody Here'"):
        forget(trained_ws, [], groups=[owner, "Nobody Here"], quiet=True)
    with pytest.raises(SiftError, match="is empty once case"):
        forget(trained_ws, [], groups=["?!"], quiet=True)
    assert snapshot(trained_ws.root) == before
    cert = forget(trained_ws, ["p001-pet"], groups=[owner, "Nobody Here"], ignore_missing=True, quiet=True)
    assert cert["groups"] == {owner: 10} and cert["groups_unknown_ignored"] == 1
    assert cert["rows_removed"] == 11  # the group's ten and one more id


def test_group_needs_a_grouped_workspace(tmp_path, facts):
    from conftest import build_workspace, tiny_config

    ws = build_workspace(tmp_path / "ws", facts[:12], tiny_config(group_by=None), merge=None)
    with pytest.raises(SiftError, match="--group needs a workspace made with --group-by"):
        forget(ws, [], groups=[facts[0]["owner"]], quiet=True)
    with pytest.raises(SiftError, match="--group needs a workspace made with --group-by"):
        find_rows(WorkspaceView.load(ws), groups=["x"])


def test_find_by_group_and_text(trained_ws, facts):
    view = WorkspaceView.load(trained_ws)
    owner = facts[0]["owner"]
    mine = sorted(r["id"] for r in facts if r["owner"] == owner)
    assert find_rows(view, groups=[owner.upper()]).ids == mine
    answer = facts[0]["answer"]  # sits in completion, answer and paraphrase columns
    hits = find_rows(view, texts=[answer.swapcase()])
    assert facts[0]["id"] in hits.ids and hits.by_text == {answer.swapcase(): len(hits.ids)}
    assert all(answer.casefold() in json.dumps(r, ensure_ascii=False).casefold() for r in facts if r["id"] in hits.ids)
    both = find_rows(view, groups=[owner, "Nobody"], texts=[answer])
    assert set(both.ids) == set(mine) | set(hits.ids) and both.by_group == {owner: 10, "Nobody": 0}
    with pytest.raises(SiftError, match="give --group"):
        find_rows(view)


def test_find_piped_into_forget(trained_ws, facts):
    root = str(trained_ws.root)
    owner = facts[0]["owner"]
    found = sift("find", "-w", root, "--group", owner)
    assert found.returncode == 0, found.stderr
    ids = found.stdout.split()
    assert ids == sorted(r["id"] for r in facts if r["owner"] == owner)
    as_json = json.loads(sift("find", "-w", root, "--group", owner, "--json").stdout)
    assert as_json["ids"] == ids and as_json["rows"] == 10
    p = sift("forget", "-w", root, "--ids", "-", "--json", stdin=found.stdout)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rows_removed"] == 10
    gone = sift("find", "-w", root, "--group", owner)
    assert gone.returncode == 1 and gone.stdout == ""  # nothing matches any more: exit 1, as grep
