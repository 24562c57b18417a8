#!/usr/bin/env bash
# Creates bench/.venv-peers with the tools bench/storage.py compares against (MLflow, Trackio).
# They are never dependencies of stepscope: this environment is the benchmark's own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=bench/.venv-peers
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Pinned: the numbers in bench/results/store.txt were measured with these versions.
"$VENV/bin/python" -m pip install -q "mlflow==3.17.2" "trackio==0.43.0" numpy uvicorn
