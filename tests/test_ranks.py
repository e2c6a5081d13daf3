"""Shards across processes: ranks of one launch (RANK / WORLD_SIZE, as accelerate launch and
torchrun set them) or shell jobs with --shards train disjoint shards of one workspace at once and
write the same bytes as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sift.adapters import read_meta
from sift.train import rank_shards
from sift.workspace import Workspace
from sift.workspace.view import WorkspaceView

TRAIN = ["--model", "builtin-tiny", "--num-shards", "4", "--group-by", "owner", "--epochs", "1", "--json"]


def _start(args: list[str], env_extra: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(env_extra or {})
    # one thread each, as a launch of two ranks on two cores gives them; the lone run matches it
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "sift.cli", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(p: subprocess.Popen, stdin: str | None = None) -> dict:
    out, err = p.communicate(stdin, timeout=300)
    assert p.returncode == 0, err
    return json.loads(out)


def _adapters(root: Path) -> dict[int, str]:
    ws = Workspace(root)
    return {s: m["adapter_sha256"] for s in range(4) if (m := read_meta(ws.adapter_dir(s)))}


def _data() -> str:
    return subprocess.run(
        [sys.executable, "-m", "sift.cli", "builtin-data", "--people", "6"], capture_output=True, text=True, check=True
    ).stdout


def test_two_ranks_train_disjoint_shards_with_the_bytes_of_one_process(tmp_path):
    data = _data()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(data)
    alone = _finish(_start(["train-shards", "-w", str(tmp_path / "alone"), "--data", str(rows), *TRAIN]))
    ranks = [
        _start(
            ["train-shards", "-w", str(tmp_path / "ranks"), "--data", str(rows), *TRAIN],
            {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]
    summaries = [_finish(p) for p in ranks]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    trained = [set(s["trained"]) for s in summaries]
    assert not trained[0] & trained[1]  # disjoint
    assert trained[0] | trained[1] == set(alone["trained"])
    assert all(s["trained"] for s in summaries)  # both ranks had work
    assert _adapters(tmp_path / "ranks") == _adapters(tmp_path / "alone")


@pytest.mark.slow  # over 35 s here; run with scripts/test.sh -m slow
def test_overlapping_shell_jobs_do_not_train_a_shard_twice(tmp_path):
    data = _data()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(data)
    root = tmp_path / "ws"
    _finish(_start(["train-shards", "-w", str(root), "--data", str(rows), *TRAIN, "--shards", "0"]))
    jobs = [_start(["train-shards", "-w", str(root), "--shards", spec, "--json"]) for spec in ("0-2", "1-3")]
    summaries = [_finish(p) for p in jobs]
    counts = [s for summary in summaries for s in summary["trained"]]
    assert len(counts) == len(set(counts))  # shards 1 and 2 were trained by one job; the other found them done
    alone = tmp_path / "alone"
    _finish(_start(["train-shards", "-w", str(alone), "--data", str(rows), *TRAIN]))
    assert _adapters(root) == _adapters(alone)


def test_rank_split_is_balanced_and_covers_every_shard(tmp_path, facts):
    from conftest import build_workspace, tiny_config

    cfg = tiny_config(num_shards=4)
    ws = build_workspace(tmp_path / "ws", facts, cfg, merge=None)
    view = WorkspaceView.load(ws)
    parts = [rank_shards(view, list(range(4)), r, 2) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == [0, 1, 2, 3] and not set(parts[0]) & set(parts[1])
    load = [sum(len(view.rows.get(s, [])) for s in p) for p in parts]
    assert max(load) - min(load) <= max(len(r) for r in view.rows.values())


@pytest.mark.slow  # over 35 s here; run with scripts/test.sh -m slow
def test_accelerate_launch_splits_the_shards(tmp_path):
    """The real launcher: on CPU, `accelerate launch --multi_gpu` starts torchrun-style workers
    (its `--cpu` with several processes needs mpirun); sift needs only their RANK / WORLD_SIZE."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(_data())
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
            "-m",
            "sift.cli",
            "train-shards",
            "-w",
            str(tmp_path / "ranks"),
            "--data",
            str(rows),
            *TRAIN,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    summaries = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1] and all(s["world_size"] == 2 for s in summaries)
    _finish(_start(["train-shards", "-w", str(tmp_path / "alone"), "--data", str(rows), *TRAIN]))
    assert _adapters(tmp_path / "ranks") == _adapters(tmp_path / "alone")


def test_a_workspace_pins_the_thread_count_its_training_uses(tmp_path, facts, monkeypatch):
    """Reductions split by thread count change an adapter's bytes (measured on the builtin model:
    1 and 2 threads give different adapters), so every training of a workspace uses the count it
    was made with, whatever the process's own."""
    import torch

    import sift.train as train_mod

    from conftest import build_workspace, tiny_config

    before = torch.get_num_threads()
    ws = build_workspace(tmp_path / "ws", facts, tiny_config(num_shards=2), merge=None)
    cfg = ws.load_config()
    assert cfg.train.threads == before and "threads" in cfg.training_dict()["train"]
    seen = []
    real = train_mod.run_loop
    monkeypatch.setattr(train_mod, "run_loop", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    cfg.train.threads = 1 if before != 1 else 2
    ws.save_config(cfg)
    try:
        torch.set_num_threads(3)
        train_mod.train_shards(ws, quiet=True)  # the config changed: every shard retrains
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {cfg.train.threads}
    legacy = tiny_config()
    assert legacy.train.threads == 0 and "threads" not in legacy.training_dict()["train"]
