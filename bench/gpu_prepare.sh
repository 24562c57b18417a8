#!/usr/bin/env bash
# Prepares what bench/gpu_check.sh carries to a lent GPU machine (both folders are git-ignored locally:
# add "/.whl/" and "/gpu-assets/" to .git/info/exclude). Then call the device tool's run with
# command "bash bench/gpu_check.sh" and carry [".whl", "gpu-assets"].
#   .whl/        wheels (Python 3.12, x86-64) of what the GPU image lacks: the database stack and the web stack
#   gpu-assets/  SmolLM2-135M's config and tokenizer (its weights are too large to carry; the check builds
#                a model of the same shape with random weights)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl gpu-assets/smol
for pkg in sqlmodel SQLAlchemy alembic Mako pydantic pydantic-core annotated-types typing-inspection \
           pydantic-settings python-dotenv greenlet; do
  version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$pkg'))")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$pkg==$version"
done
STEPSCOPE_HOME=${STEPSCOPE_HOME:-$HOME/.stepscope} .venv/bin/python - <<'PY'
import shutil
from pathlib import Path
from app.config import get_settings
from trainer.models import _convert_smollm2
folder = _convert_smollm2(get_settings().model_cache_dir)
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (folder / name).exists():
        shutil.copy(folder / name, Path("gpu-assets/smol") / name)
PY
du -sh .whl gpu-assets
