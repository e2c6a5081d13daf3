"""The commands as a user types them: pipes, JSON on stdout, one-line errors, exit codes."""

import json
import os
import subprocess
import sys

from conftest import snapshot


def sift(*args, stdin=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sift.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ),
        timeout=300,
    )


def one_error_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("sift: error: "), proc.stderr
    return lines[0]


def test_readme_pipeline_tiny(tmp_path):
    data = sift("builtin-data", "--people", "4").stdout
    assert len(data.splitlines()) == 40
    ws = str(tmp_path / "ws")
    p = sift(
        "train-shards",
        "-w",
        ws,
        "--data",
        "-",
        "--model",
        "builtin-tiny",
        "--num-shards",
        "3",
        "--group-by",
        "owner",
        "--epochs",
        "1",
        "--json",
        stdin=data,
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["created"] and summary["trained"]
    p = sift("merge", "-w", ws, "--method", "mean", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["method"] == "mean", p.stderr
    p = sift("generate", "-w", ws, "Where was Thesi Morifoum born?", "--max-new-tokens", "4", "--json")
    assert p.returncode == 0 and len(json.loads(p.stdout)["answers"]) == 1, p.stderr
    ids = "\n".join(json.loads(line)["id"] for line in data.splitlines()[:10]) + "\n"
    p = sift("forget", "-w", ws, "--ids", "-", "--json", stdin=ids)
    assert p.returncode == 0, p.stderr
    cert = json.loads(p.stdout)
    assert cert["rows_removed"] == 10 and cert["merge"]["mode"] == "incremental"
    p = sift("verify", "-w", ws, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["identical"] is True
    p = sift("forget", "-w", ws, "--ids", "p000-birthplace")
    assert p.returncode == 0 and "already forgotten" in p.stdout
    p = sift("status", "-w", ws, "--json")
    assert json.loads(p.stdout)["rows"] == 30 and json.loads(p.stdout)["forgets"] == 1


def test_bad_inputs_one_line_and_nothing_changed(trained_ws, tmp_path):
    ws = str(trained_ws.root)
    before = snapshot(trained_ws.root)
    assert "not in workspace" in one_error_line(sift("forget", "-w", ws, "--ids", "nope,p000-pet"))
    assert "no ids given" in one_error_line(sift("forget", "-w", ws))
    assert "unknown merge method" in one_error_line(sift("merge", "-w", ws, "--method", "median"))
    assert "exists with other settings" in one_error_line(sift("train-shards", "-w", ws, "--epochs", "7"))
    assert snapshot(trained_ws.root) == before

    bad = tmp_path / "bad.jsonl"
    for content, message in [
        ('{"text": "no id"}\n', "missing id column 'id'"),
        ('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n', "duplicate ids"),
        ("", "is empty"),
        ('{"id": 1, "text": "a"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
    ]:
        bad.write_text(content)
        target = tmp_path / "new-ws"
        line = one_error_line(sift("train-shards", "-w", str(target), "--data", str(bad), "--model", "builtin-tiny"))
        assert message in line
        assert not target.exists()  # a refused data set leaves no folder behind
    assert "not a sift workspace" in one_error_line(sift("verify", "-w", str(tmp_path / "nowhere")))


def test_busy_workspace_is_refused(trained_ws):
    from sift.workspace import Workspace

    with Workspace(trained_ws.root).lock(command="test-holder"):
        line = one_error_line(sift("forget", "-w", str(trained_ws.root), "--ids", "p000-pet"))
    assert "in use by pid" in line and "test-holder" in line


def test_merged_answers_are_not_blocked_by_a_writer(trained_ws):
    """A running merge or forget holds the workspace lock: `generate --merged` reads the served
    folder (swapped in whole) without the lock; a routed answer says in one line that it waits."""
    from sift.workspace import Workspace

    ws = str(trained_ws.root)
    with Workspace(trained_ws.root).lock(command="forget"):
        p = sift("generate", "-w", ws, "--merged", "Where was Thesi Morifoum born?", "--max-new-tokens", "2", "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["served_by"]["path"] == "merged"
        assert "in use by pid" in one_error_line(
            sift("generate", "-w", ws, "Where was Thesi Morifoum born?", "--max-new-tokens", "2")
        )


def test_merge_list_and_help():
    p = sift("merge", "--list", "--json")
    names = {m["name"]: m for m in json.loads(p.stdout)["methods"]}
    assert names["mean"]["exact"] and names["mean"]["incremental"]
    p = sift("forget", "--help")
    assert p.returncode == 0 and "--ids-file" in p.stdout
