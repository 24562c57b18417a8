#!/usr/bin/env bash
# One command: install everything (test tools and Debian's Chromium included), then lint, type-check and test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh dev
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/ruff check app trainer tests bench
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
