"""Every file that serves requests is reproducible, not only the weights: peft's adapter_config.json
used to list target_modules in set order (Python's per-process string hashing), and `sift verify`
compared weights only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sift.exact.verify import verify


def _train(root, rows, hash_seed: str) -> bytes:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "sift.cli",
            "train-shards",
            "-w",
            str(root),
            "--data",
            str(rows),
            "--model",
            "builtin-tiny",
            "--num-shards",
            "2",
            "--epochs",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    return b"".join((root / "adapters" / f"shard-{s:04d}" / "adapter_config.json").read_bytes() for s in range(2))


@pytest.mark.slow  # over 10 s on 2 cores; keeps the default run under 10 minutes
def test_adapter_config_is_the_same_bytes_whatever_the_hash_seed(tmp_path, facts):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in facts))
    a = _train(tmp_path / "a", rows, "1")
    b = _train(tmp_path / "b", rows, "2")
    assert a == b
    config = json.loads((tmp_path / "a" / "adapters" / "shard-0000" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"]) and len(config["target_modules"]) > 1


def test_verify_compares_adapter_configs_and_served_files(trained_ws):
    assert verify(trained_ws, quiet=True)["identical"]
    config = trained_ws.adapter_dir(0) / "adapter_config.json"
    original = config.read_text()
    config.write_text(json.dumps(json.loads(original)))  # same content, other bytes
    result = verify(trained_ws, quiet=True)
    assert not result["identical"] and result["mismatched_shard_files"] == ["shard-0000/adapter_config.json"]
    config.write_text(original)
    tok = trained_ws.merged_dir / "tokenizer_config.json"
    tok.write_text(tok.read_text() + " ")
    result = verify(trained_ws, quiet=True)
    assert not result["identical"] and result["mismatched_served_files"] == ["tokenizer_config.json"]
