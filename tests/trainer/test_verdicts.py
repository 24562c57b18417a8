"""A real tiny-model SGD sweep: the analysis must call the rates too low, right and too high."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from analysis.sweeps import summarize_sweep
from tests.trainer.conftest import train

RATES = {1e-3: {"too_low"}, 1e-1: {"ok"}, 3.0: {"too_high", "diverged"}}


def test_sgd_sweep_verdicts_and_recommendation(home: Path) -> None:
    for lr in RATES:
        # On the CPU in fp32: bf16 autocast on a GPU changes the trajectories enough to move the verdicts.
        train("--optimizer", "sgd", "--learning-rate", str(lr), "--max-grad-norm", "0", "--max-steps", "100",
              "--batch-size", "16", "--dataset", "synthetic-lookup", "--eval-every", "0", "--device", "cpu",
              "--precision", "fp32")  # fmt: skip
    with sqlite3.connect(home / "stepscope.db") as conn:
        rows = conn.execute("SELECT id, learning_rate, status, verdict, summary FROM runs ORDER BY id").fetchall()
    runs = [{"id": i, "learning_rate": lr, "status": st, "summary": json.loads(s)} for i, lr, st, _, s in rows]
    for (_, lr, _, verdict, _), run in zip(rows, runs, strict=True):
        assert verdict in RATES[lr], (lr, verdict, run["summary"]["reason"])
    sweep = summarize_sweep(runs)
    assert sweep["recommended_lr"] == 1e-1
    assert [r["learning_rate"] for r in sweep["ranking"]][0] == 1e-1
