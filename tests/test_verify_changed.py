"""`sift verify --changed`: rebuild only what changed since the last passing verify, hash-check
the rest against its record, merge everything from scratch; it must fail whenever a full
verify would."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from sift.errors import SiftError
from sift.exact.forget import forget
from sift.exact.verify import VERIFIED_FILE, verify
from sift.hashing import shard_of
from sift.workspace.rows import read_manifest


@pytest.fixture
def verified(trained_ws, facts):
    """A verified workspace, then one forget of an owner: returns (ws, the owner's shard)."""
    assert verify(trained_ws, quiet=True)["identical"]
    owner = facts[0]["owner"]
    forget(trained_ws, [r["id"] for r in facts if r["owner"] == owner], quiet=True)
    return trained_ws, shard_of(owner, 4)


def _served(ws) -> list[int]:
    return sorted(set(read_manifest(ws).values()))


def test_changed_rebuilds_what_the_forget_touched_and_checks_the_rest(verified):
    ws, shard = verified
    result = verify(ws, changed=True, quiet=True)
    assert result["identical"] and result["mode"] == "changed"
    assert result["rebuilt"] == [shard] and result["rebuilt_because"] == {
        str(shard): "rows or config changed since the last verify"
    }
    assert result["hash_checked"] == [s for s in _served(ws) if s != shard]
    record = json.loads((ws.root / VERIFIED_FILE).read_text())
    assert record["mode"] == "changed" and record["served_sha256"] == result["served_sha256"]
    again = verify(ws, changed=True, quiet=True)  # nothing changed since: nothing to rebuild
    assert again["identical"] and again["rebuilt"] == [] and again["steps"] == 0


def test_sample_rebuilds_seeded_untouched_shards(verified):
    ws, shard = verified
    a = verify(ws, changed=True, sample=2, seed=3, quiet=True)
    assert a["identical"] and len(a["sampled"]) == 2 and shard not in a["sampled"]
    assert a["rebuilt"] == sorted({shard, *a["sampled"]})
    assert set(a["hash_checked"]) == set(_served(ws)) - {shard} - set(a["sampled"])
    # once a passed, nothing changed: --sample alone rebuilds only its draw, the same for the same seed
    b, c = (verify(ws, sample=3, seed=5, quiet=True) for _ in range(2))
    assert b["identical"] and c["identical"] and b["sampled"] == c["sampled"] == b["rebuilt"]
    assert len(b["sampled"]) == 3 and len(b["hash_checked"]) == len(_served(ws)) - 3


def test_changed_fails_when_an_untouched_adapter_file_is_altered(verified):
    ws, shard = verified
    other = next(s for s in _served(ws) if s != shard)
    path = ws.adapter_dir(other) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * 1.001
    save_file(tensors, str(path), metadata={"format": "pt"})
    result = verify(ws, changed=True, quiet=True)
    assert not result["identical"] and other in result["mismatched_adapters"]
    assert result["rebuilt_because"][str(other)] == "its files changed since the last verify"


def test_changed_fails_when_an_untouched_shards_rows_are_altered(verified):
    ws, shard = verified
    other = next(s for s in _served(ws) if s != shard)
    path = ws.shard_file(other)
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    row["completion"] = row["completion"] + " (edited)"
    lines[0] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    result = verify(ws, changed=True, quiet=True)
    assert not result["identical"] and other in result["rebuilt"] and other in result["mismatched_adapters"]


def test_changed_fails_when_the_changed_shards_adapter_is_altered(verified):
    ws, shard = verified
    path = ws.adapter_dir(shard) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key] + 1e-4
    save_file(tensors, str(path), metadata={"format": "pt"})
    result = verify(ws, changed=True, quiet=True)
    assert not result["identical"] and result["mismatched_adapters"] == [shard]
    assert not (ws.root / VERIFIED_FILE).read_text().count('"changed"')  # a failed verify records nothing


def test_changed_after_an_add_rebuilds_the_shards_it_trained(trained_ws, facts, tmp_path):
    from sift.exact.add import add

    from conftest import write_rows

    assert verify(trained_ws, quiet=True)["identical"]
    new = [dict(r, id="n-" + r["id"], owner="Ana Newcomer") for r in facts[:4]]
    cert = add(trained_ws, str(write_rows(tmp_path / "new.jsonl", new)), quiet=True)
    result = verify(trained_ws, changed=True, quiet=True)
    assert result["identical"] and result["rebuilt"] == cert["shards_retrained"] + cert["shards_trained"]


def test_changed_needs_a_recorded_verify(trained_ws):
    with pytest.raises(SiftError, match="no record of a passing verify"):
        verify(trained_ws, changed=True, quiet=True)


@pytest.mark.slow  # runs a whole script (tens of seconds); `bash scripts/test.sh -m slow`
def test_bench_forget_script_runs_on_the_tiny_model():
    """scripts/bench_forget.py end to end (a smoke run): every proof it times says identical."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_forget.py"
    p = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            "builtin-tiny",
            "--people",
            "4",
            "--shards",
            "2",
            "--slices",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(p.stdout)
    assert result["identical"] and result["plain"]["changed_rebuilt"] == result["plain"]["second_retrained"]
    assert result["changed_over_forget2"] > 0
