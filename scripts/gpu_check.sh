#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): set up .venv if needed, then one run of at most 8 minutes
# on this machine's GPU; extra arguments go to the script (e.g. --device cuda:1, --json).
# On a machine without a GPU: scripts/gpu_check.sh --device cpu --short (what the tests run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh > /dev/null
exec timeout 480 .venv/bin/python scripts/gpu_check.py "$@"
