#!/usr/bin/env bash
# The test command of the README: set up .venv if needed, then the default (fast) test run.
# Slow tests (the real builtin model) run with: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# the layout cannot rot: lint, format and the import layering (pyproject.toml) before the tests
.venv/bin/ruff check sift tests scripts
.venv/bin/ruff format --check -q sift tests scripts
.venv/bin/lint-imports --no-cache > /dev/null || .venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"
