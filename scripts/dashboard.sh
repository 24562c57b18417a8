#!/usr/bin/env bash
# One command for a new user: install everything, then start the dashboard on http://127.0.0.1:8000
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/stepscope serve "$@"
