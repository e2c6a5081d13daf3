"""SIGKILL at random moments of train-shards, merge, forget and add; the rerun must end where an
uninterrupted run ends, byte for byte (scripts/crash_harness.py runs 20 kills per command on
the builtin model; here two per command on the tiny one)."""

import importlib.util
import random
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parent.parent / "scripts" / "crash_harness.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("crash_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["crash_harness"] = module
    spec.loader.exec_module(module)
    return module


def test_fingerprint_sees_staging_leftovers_and_ignores_only_clock_fields(harness, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sift-meta.json").write_text('{"seconds": 1.5, "adapter_sha256": "x"}')
    before = harness.fingerprint(tmp_path)
    (tmp_path / "a" / "sift-meta.json").write_text('{"seconds": 9.0, "adapter_sha256": "x"}')
    assert harness.fingerprint(tmp_path) == before
    (tmp_path / "a" / "sift-meta.json").write_text('{"seconds": 9.0, "adapter_sha256": "y"}')
    assert harness.fingerprint(tmp_path) != before
    (tmp_path / "a" / "sift-meta.json").write_text('{"seconds": 1.5, "adapter_sha256": "x"}')
    (tmp_path / "a" / ".model.safetensors.123.tmp").write_bytes(b"half")
    assert harness.fingerprint(tmp_path) != before


@pytest.mark.slow  # over 35 s here; run with scripts/test.sh -m slow
def test_kills_then_rerun_equal_an_uninterrupted_run(harness, tmp_path):
    data = tmp_path / "rows.jsonl"
    harness.make_rows(data, people=4)
    startup = harness.startup_seconds()
    rng = random.Random(7)
    outcomes = [
        harness.run_scenario(
            sc, data, 2, rng, tmp_path / "work", startup, log=lambda m: None, repeats=1 if sc.name == "forget" else 0
        )
        for sc in harness.scenarios("builtin-tiny", 3, 1, 2, "p000-pet,p001-pet,p002-birthplace")
    ]
    print(harness.table(outcomes))
    for o in outcomes:
        assert o.ok, (o.command, o.reader_findings, o.rerun_failures, o.mismatches)
    assert sum(o.kills for o in outcomes) >= 3  # most trials were killed, not finished first
    assert [o.repeats for o in outcomes] == [0, 0, 1, 0]
