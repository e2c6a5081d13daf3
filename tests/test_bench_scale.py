"""scripts/bench_scale.py runs end to end (a tiny Llama shape, two adapters), so the benchmark
behind docs/gpus.md keeps working: every phase reports, the sift merges stream, and the merged
entries are counted. Its timings are printed, never asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # runs a whole script (tens of seconds); `bash scripts/test.sh -m slow`
def test_bench_scale_runs_every_phase():
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_scale.py"),
            "--params",
            "tiny",
            "--adapters",
            "2",
            "--rank",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    phases = out["phases"]
    assert set(phases) == {"fingerprint", "scratch", "drop-one", "peft"}
    assert phases["scratch"]["streamed"] and phases["drop-one"]["streamed"]
    assert phases["scratch"]["touched"] > 0 and phases["fingerprint"]["fingerprint"].startswith("disk1:")
    assert all(r["peak_rss_gib"] > 0 and r["seconds"] >= 0 for r in phases.values())
