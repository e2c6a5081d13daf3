"""`sift audit`: a forget leaves no copy of the deleted rows anywhere; planted leaks are found."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from sift.cli import app
from sift.exact.audit import audit
from sift.exact.forget import forget
from sift.models import example_ids, load_tokenizer
from sift.workspace import Workspace
from sift.workspace.create import create_workspace

from conftest import tiny_config


@pytest.fixture
def forgotten(trained_ws, facts, tmp_path, monkeypatch):
    """A workspace after forgetting two rows, the data file, and an empty datasets cache."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    (tmp_path / "datasets-cache").mkdir()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in facts))
    gone = [facts[0], facts[13]]
    forget(trained_ws, [r["id"] for r in gone], quiet=True)
    return trained_ws, data, gone


def test_a_forget_leaves_nothing_behind(forgotten):
    ws, data, gone = forgotten
    report = audit(ws, data=str(data))
    assert report.clean, report.as_dict()
    assert report.rows_searched == 2 and report.needles >= 12 and report.files_searched > 20


def _tokens(ws: Workspace, row: dict) -> list[int]:
    tok = load_tokenizer("builtin-tiny")
    return example_ids(tok, row.get("prompt"), row.get("completion"), row.get("text"))[0]


def test_planted_leaks_are_found_wherever_they_hide(forgotten, tmp_path):
    import datasets.config

    ws, data, gone = forgotten
    row = gone[0]
    root = ws.root
    tokens = _tokens(ws, row)
    (root / "logs").mkdir()
    (root / "logs" / "train.log").write_text(f"step 3: sample {row['completion']!s}\n")  # a log line
    (root / "shards" / ".shard-0000.jsonl.x1.tmp").write_text(json.dumps(row) + "\n")  # a staging leftover
    (root / "cache").mkdir()
    (root / "cache" / "tokens.bin").write_bytes(np.asarray(tokens, dtype="<i8").tobytes())  # a tokenised cache
    (root / "cache" / "tokens32.npy").write_bytes(b"\x93NUMPY" + np.asarray(tokens, dtype="<i4").tobytes())
    (root / "cache" / "batch.json").write_text(json.dumps({"input_ids": tokens}))
    save_file(
        {"ids": torch.tensor(tokens, dtype=torch.int64)}, str(root / "adapters" / "shard-0001" / "extra.safetensors")
    )
    leak = Path(datasets.config.HF_DATASETS_CACHE) / "json" / "cache-1.arrow"
    leak.parent.mkdir(parents=True)
    leak.write_bytes(b"\x00" * 7 + row["prompt"].encode() + b"\x00")  # a datasets cache outside the workspace

    report = audit(ws, data=str(data))
    found = {(f.path, f.kind) for f in report.findings}
    assert not report.clean
    assert ("logs/train.log", "text") in found
    assert ("shards/.shard-0000.jsonl.x1.tmp", "text") in found and ("shards/.shard-0000.jsonl.x1.tmp", "id") in found
    assert ("cache/tokens.bin", "tokens-int64") in found
    assert ("cache/tokens32.npy", "tokens-int32") in found
    assert ("cache/batch.json", "tokens-json") in found
    assert ("adapters/shard-0001/extra.safetensors", "tokens-int64") in found
    assert (str(leak), "text") in found
    assert {f.row for f in report.findings} == {row["id"]}  # the other forgotten row left no trace
    # without the caches the datasets leak is not searched
    assert all(not f.path.startswith("/") for f in audit(ws, data=str(data), caches=False).findings)


def test_ledger_journal_and_held_ids_are_checked(forgotten):
    ws, data, gone = forgotten
    report = audit(ws, ids=["p001-pet", gone[0]["id"], "never-there"], caches=False)
    problems = " ".join(report.problems)
    assert "'p001-pet' is still held" in problems and "'never-there' is neither held nor recorded" in problems
    assert gone[0]["id"] not in problems
    ws.journal_path.write_text("{}")
    assert any("cut short" in p for p in audit(ws, data=str(data), caches=False).problems)
    ws.journal_path.unlink()
    lines = ws.ledger_path.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["rows_removed"] = 1
    ws.ledger_path.write_text(json.dumps(entry) + "\n")
    assert any("hash chain broken" in p for p in audit(ws, data=str(data), caches=False).problems)


def test_cli_exit_codes(forgotten):
    ws, data, gone = forgotten
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "-w", str(ws.root), "--data", str(data), "--json"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["clean"] is True
    (ws.root / "notes.txt").write_text(gone[1]["completion"])
    bad = runner.invoke(app, ["audit", "-w", str(ws.root), "--data", str(data)])
    assert bad.exit_code == 1 and "FOUND" in bad.stdout and "notes.txt" in bad.stdout
    none = runner.invoke(app, ["audit", "-w", str(ws.root)])
    assert none.exit_code == 2 and "give --data" in none.stderr


def test_rows_read_through_datasets_leave_no_copy_in_its_cache(facts, tmp_path, monkeypatch):
    """CSV and Parquet go through `datasets`, with a throw-away cache: after a forget neither the
    workspace nor the user's datasets cache holds the row."""
    import datasets.config

    cache = tmp_path / "datasets-cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "owner", "prompt", "completion"])
        w.writeheader()
        for r in facts[:20]:
            w.writerow({k: r[k] for k in ("id", "owner", "prompt", "completion")})
    ws = Workspace(tmp_path / "ws")
    create_workspace(ws, str(path), tiny_config(num_shards=2, epochs=1))
    forget(ws, [facts[0]["id"]], quiet=True)  # no served model yet: rows, manifest, adapters
    report = audit(ws, data=str(path))
    assert report.clean, report.as_dict()
    assert report.searched.get("datasets", "").startswith(str(cache))


@pytest.mark.slow  # over 35 s here; run with scripts/test.sh -m slow
def test_commands_write_nothing_outside_the_workspace(tmp_path):
    """The README's commands, run with HOME and TMPDIR pointing at empty folders: every file
    they leave is inside the workspace (the model cache, SIFT_CACHE_DIR, aside; verify's
    rebuild goes to TMPDIR and is removed)."""
    import os
    import subprocess
    import sys

    home, tmp, work = tmp_path / "home", tmp_path / "tmp", tmp_path / "work"
    for d in (home, tmp, work):
        d.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(tmp))
    env.pop("HF_HOME", None)

    def sift(*args: str, stdin: str | None = None) -> str:
        p = subprocess.run(
            [sys.executable, "-m", "sift.cli", *args],
            cwd=work,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr
        return p.stdout

    rows = sift("builtin-data", "--people", "3")
    sift(
        "train-shards",
        "-w",
        "ws",
        "--data",
        "-",
        "--model",
        "builtin-tiny",
        "--num-shards",
        "2",
        "--group-by",
        "owner",
        "--epochs",
        "1",
        stdin=rows,
    )
    sift("merge", "-w", "ws")
    sift("generate", "-w", "ws", "Where was Thesi Morifoum born?", "--max-new-tokens", "2")
    sift("forget", "-w", "ws", "--ids", "p000-pet")
    sift("verify", "-w", "ws")
    (tmp_path / "rows.jsonl").write_text(rows)
    sift("audit", "-w", "ws", "--data", str(tmp_path / "rows.jsonl"))
    outside = [p for root in (home, tmp) for p in root.rglob("*") if p.is_file()]
    assert outside == []
    assert sorted(p.name for p in work.iterdir()) == ["ws"]
