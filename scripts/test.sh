#!/usr/bin/env bash
# The test command of the README: set up .venv if needed, then the default (fast) test run.
# Slow tests (the real builtin model) run with: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
