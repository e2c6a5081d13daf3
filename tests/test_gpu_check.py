"""The GPU check script runs end to end here too (`--device cpu --short`), so none of its code
paths is dead when a GPU machine finally runs it: every check reports, and the exact ones pass."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # runs a whole script (tens of seconds); `bash scripts/test.sh -m slow`
def test_gpu_check_runs_on_the_cpu():
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--short", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    status = {}
    for r in result["results"]:
        status.setdefault(r["check"], set()).add(r["status"])
    assert result["device"] == "cpu"
    for check in ("repeat", "exact", "ranks", "fixed-point"):
        assert status[check] == {"PASS"}, (check, status)
    assert status["stack"] == {"INFO"} and status["speed"] == {"INFO"} and status["memory"] == {"INFO"}
