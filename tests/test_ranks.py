"""Shards across processes: ranks of one launch (RANK / WORLD_SIZE, as accelerate launch and
torchrun set them) or shell jobs with --shards train disjoint shards of one workspace at once and
write the same bytes as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def alone_run(tmp_path_factory) -> tuple[Path, dict[int, str], Path]:
    """The data set, the adapters one process trains from it (what every launch must match),
    and that workspace."""
    root = tmp_path_factory.mktemp("alone")
    rows = root / "rows.jsonl"
    rows.write_text(_data())
    _finish(_start(["train-shards", "-w", str(root / "ws"), "--data", str(rows), *TRAIN]))
    return rows, _adapters(root / "ws"), root / "ws"


@pytest.fixture
def rows_and_alone(alone_run) -> tuple[Path, dict[int, str]]:
    return alone_run[0], alone_run[1]


def test_three_ranks_train_each_shard_once_with_the_bytes_of_one_process(tmp_path, rows_and_alone):
    rows, alone = rows_and_alone
    ranks = [
        _start(
            ["train-shards", "-w", str(tmp_path / "ranks"), "--data", str(rows), *TRAIN],
            {"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r)},
        )
        for r in range(3)
    ]
    summaries = [_finish(p) for p in ranks]
    assert sorted(s["rank"] for s in summaries) == [0, 1, 2]
    trained = [s for summary in summaries for s in summary["trained"]]
    assert len(trained) == len(set(trained))  # no shard trained twice
    assert set(trained) == set(alone)
    for summary in summaries:  # every rank walked every shard: trained it, or found it done
        assert set(summary["shards"]) == {"0", "1", "2", "3"}
        assert set(summary["shards"].values()) <= {"trained", "unchanged"}
    assert _adapters(tmp_path / "ranks") == alone


@pytest.mark.slow  # over 10 s on 2 cores; keeps the default run under 10 minutes
def test_verify_under_a_launch_shares_one_rebuild_and_rank_0_compares(alone_run):
    rows, alone, root = alone_run
    _finish(_start(["merge", "-w", str(root), "--json"]))
    env = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "verify-test"}
    ranks = [_start(["verify", "-w", str(root), "--json"], {**env, "RANK": str(r)}) for r in range(2)]
    first, second = (_finish(p) for p in ranks)
    assert first["rank"] == 0 and first["identical"] is True, first
    assert second["rank"] == 1 and "identical" not in second
    rebuilt = first["rebuilt"] + second["rebuilt"]
    assert sorted(rebuilt) == sorted(alone)  # each shard rebuilt once, by one of the ranks
    assert first["steps"] == sum(read_meta(Workspace(root).adapter_dir(s))["steps"] for s in alone)

    assert sorted(p.name for p in Path(second["rebuild"]).iterdir()) == [".lock", "report.json"]  # the rebuild is gone
    late = _finish(_start(["verify", "-w", str(root), "--json"], {**env, "RANK": "1"}))
    assert late["rebuilt"] == []  # rank 0 had finished: nothing left for a late rank to do

    alone_again = _finish(_start(["verify", "-w", str(root), "--json"]))  # one process, same answer
    assert alone_again["identical"] is True and alone_again["served_sha256"] == first["served_sha256"]


HOLD = """
import fcntl, os, pathlib, sys, time
lock = pathlib.Path(sys.argv[1])
lock.parent.mkdir(parents=True, exist_ok=True)
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
junk = pathlib.Path(sys.argv[2])  # what a worker killed mid-shard leaves: a half-filled staging folder
junk.mkdir(parents=True)
(junk / "adapter_model.safetensors").write_bytes(b"half")
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # over 10 s on 2 cores; keeps the default run under 10 minutes
def test_a_shard_whose_worker_is_killed_is_trained_by_another(tmp_path, rows_and_alone):
    """A worker holds the largest shard's lock mid-shard and is killed (SIGKILL) while a second
    worker runs: the second passes the held shard over, trains the rest, and takes the killed
    worker's shard once its lock dies with it; the bytes are one process's."""
    rows, alone = rows_and_alone
    root = tmp_path / "ws"
    _finish(_start(["train-shards", "-w", str(root), "--data", str(rows), *TRAIN, "--shards", "0"]))
    view = WorkspaceView.load(Workspace(root))
    held = max((s for s in range(1, 4) if view.rows.get(s)), key=lambda s: (len(view.rows[s]), -s))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLD,
            str(root / ".locks" / f"shard-{held:04d}.lock"),
            str(root / "adapters" / f".shard-{held:04d}.killed.tmp"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        worker = _start(["train-shards", "-w", str(root), "--shards", "0-3", "--json"])
        others = {s for s in alone if s not in (0, held)}
        deadline = time.monotonic() + 300
        while set(_adapters(root)) != others | {0}:  # everything but the held shard is done
            assert worker.poll() is None and time.monotonic() < deadline, worker.stderr.read() if worker.poll() else ""
            time.sleep(0.2)
        time.sleep(1.0)  # the worker is polling the held shard now
        assert worker.poll() is None  # it waits for the shard, it does not give up on it
    finally:
        holder.kill()
        holder.wait()
    summary = _finish(worker)
    assert summary["trained"] == sorted(others, key=lambda s: (-len(view.rows[s]), s)) + [held]
    assert summary["shards"]["0"] == "unchanged"
    assert _adapters(root) == alone


def test_the_claim_order_walks_a_ranks_own_share_first_then_steals(tmp_path, facts):
    from sift.train import claim_order

    from conftest import build_workspace, tiny_config

    ws = build_workspace(tmp_path / "ws", facts, tiny_config(num_shards=4), merge=None)
    view = WorkspaceView.load(ws)
    size = {s: len(view.rows.get(s, [])) for s in range(4)}
    for r in range(2):
        order = claim_order(view, list(range(4)), r, 2)
        own = rank_shards(view, list(range(4)), r, 2)
        assert sorted(order) == [0, 1, 2, 3] and sorted(order[: len(own)]) == own
        for part in (order[: len(own)], order[len(own) :]):  # most rows first within each part
            assert [size[s] for s in part] == sorted((size[s] for s in part), reverse=True)


def test_the_steal_walk_revisits_a_held_shard_until_it_is_free():
    import contextlib

    from sift.train import steal_walk

    busy = {2: 3}  # shard 2 is held elsewhere for its first three visits
    visits, done = [], []

    @contextlib.contextmanager
    def claim(s):
        visits.append(s)
        free = busy.get(s, 0) == 0
        busy[s] = max(busy.get(s, 0) - 1, 0)
        yield free

    steal_walk([2, 0, 1], claim, done.append, poll=0.0)
    assert done == [0, 1, 2] and visits == [2, 0, 1, 2, 2, 2]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (0, 1)),
        ({"RANK": "2", "WORLD_SIZE": "4"}, (2, 4)),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "3", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "3"}, (1, 3)),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, (0, 1)),  # a batch script, not a task of an srun step
        ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}, (1, 2)),
    ],
)
def test_the_rank_comes_from_torchrun_or_an_srun_step(monkeypatch, env, expected):
    from sift.train import launch_rank

    for name in (
        "RANK",
        "WORLD_SIZE",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_STEP_ID",
        "SLURM_STEPID",
        "SLURM_STEP_NUM_TASKS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_rank() == expected


def test_a_rank_that_does_not_fit_the_world_is_refused(monkeypatch):
    from sift.errors import SiftError
    from sift.train import launch_rank

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SiftError, match="RANK 3 does not fit WORLD_SIZE 2"):
        launch_rank()


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
