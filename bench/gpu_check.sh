#!/usr/bin/env bash
# The GPU checks, in one short run on a lent GPU machine (see bench/README.md):
#   1. the trainer tests with device=auto, i.e. on CUDA with bf16 autocast (and StepBuffer's collector on CUDA);
#   2. bench/overhead.py on a SmolLM2-135M-shaped model (random weights: the GGUF file is too large to carry,
#      and step time depends on the shape, not the values).
# Expects .whl/ and gpu-assets/ as bench/gpu_prepare.sh makes them.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
python3 - <<'PY'
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
cfg = AutoConfig.from_pretrained("gpu-assets/smol")
AutoModelForCausalLM.from_config(cfg).save_pretrained("/tmp/smol-shaped")
AutoTokenizer.from_pretrained("gpu-assets/smol").save_pretrained("/tmp/smol-shaped")
PY
timeout 150 python3 -m pytest tests/trainer/test_loop.py tests/trainer/test_step_buffer.py tests/trainer/test_config.py tests/trainer/test_verdicts.py -q -p no:cacheprovider -x 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -15
for bs in 4; do
  timeout 150 python3 bench/overhead.py --model /tmp/smol-shaped --batch-size $bs --max-seq-len 128 --blocks 10 --block-steps 25 2>&1 \
    | grep -v Warning | tee "$OUT/overhead-gpu-bs$bs.txt" | tail -4
done
