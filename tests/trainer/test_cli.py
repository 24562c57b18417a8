"""`stepscope train` as a user runs it: a real subprocess, signals, exit codes and error messages."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import TINY, run_row, steps

LONG = [*TINY, "--max-steps", "100000", "--eval-every", "0"]


def start(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "STEPSCOPE_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def max_step(home: Path) -> int:
    try:
        with sqlite3.connect(home / "stepscope.db") as conn:
            return conn.execute("SELECT coalesce(max(step), 0) FROM step_metrics").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def wait_for_steps(home: Path, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (done := max_step(home)) >= n:
            return done
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} steps recorded after {timeout}s")


@pytest.mark.parametrize(
    ("sig", "status", "code"), [(signal.SIGTERM, "cancelled", 3), (signal.SIGUSR1, "interrupted", 4)]
)
def test_a_stop_signal_keeps_rows_and_adapter_and_says_why(
    home: Path, sig: signal.Signals, status: str, code: int
) -> None:
    # SIGTERM is a user's cancel; SIGUSR1 is what the job runner sends when the server shuts down.
    proc = start(home, *LONG)
    wait_for_steps(home, 20)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    run = run_row(home)
    assert run["status"] == status and run["finished_at"] is not None
    rows = steps(home)
    assert len(rows) >= 20 and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert run["steps_done"] == rows[-1]["step"]
    assert (home / "runs" / "1" / "adapter" / "adapter_model.safetensors").is_file()
    assert f"run 1: {status}" in out


def test_kill_loses_at_most_the_last_second(home: Path) -> None:
    proc = start(home, *LONG)
    wait_for_steps(home, 10)
    time.sleep(1.0)
    seen = max_step(home)  # steps already written must survive the kill ...
    time.sleep(1.5)
    proc.kill()
    proc.wait(timeout=30)
    rows = steps(home)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # ... and the writer kept up during the 1.5 s before it: the last row is at most ~1 s older than the kill
    # (the kill came 1.5 s after step `seen` was already on disk).
    seen_at = rows[seen - 1]["wall_time"]
    assert rows[-1]["wall_time"] >= seen_at + 0.5, (seen_at, rows[-1]["wall_time"])
    assert run_row(home)["status"] == "running"  # nobody could record the end: the server marks it


@pytest.mark.slow
def test_kill_with_steps_of_seconds_loses_at_most_one_step(home: Path, tmp_path: Path) -> None:
    # The default model on long texts: a step takes seconds here, longer than the writer's 0.5 s timer.
    data = tmp_path / "long.jsonl"
    data.write_text("".join(f'{{"text": "{" ".join(["slow steps"] * 70)} {i}"}}\n' for i in range(64)))
    proc = start(home, "--dataset", str(data), "--batch-size", "8", "--max-seq-len", "128", "--max-steps", "1000",
                 "--eval-every", "0", "--checkpoint-every", "0")  # fmt: skip
    wait_for_steps(home, 2, timeout=300)
    seen: dict[int, float] = {}
    while len(seen) < 3:  # when each new step's row shows up
        step = max_step(home)
        seen.setdefault(step, time.monotonic())
        time.sleep(0.02)
    step_time = (seen[max(seen)] - seen[min(seen)]) / (len(seen) - 1)
    assert step_time > 1.0, f"steps of {step_time:.2f} s: too fast to show anything"
    time.sleep(1.5 * step_time)  # into the second step after the last one seen
    killed = time.monotonic()
    proc.kill()
    proc.wait(timeout=30)
    last = steps(home)[-1]["step"]
    # The step that ended while we slept (after the last one seen) is on disk: at most the step in progress
    # is lost, never a step that ended a second or more before the kill.
    assert last >= max(seen) + 1, (last, seen, step_time, killed)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learning-rate", "-1"], "--learning-rate: must be a finite number > 0"),
        (["--learning-rate", "inf"], "--learning-rate: must be a finite number > 0"),
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
        (["--optimizer", "lion"], "--optimizer: Input should be 'adamw' or 'sgd'"),
        (["--model", "no/such-model"], "--model: unknown model 'no/such-model'"),
        (["--dataset", "nope.jsonl"], "--dataset: unknown dataset 'nope.jsonl'"),
        (["--device", "tpu"], "--device: must be auto, cpu, cuda or cuda:N"),
        pytest.param(
            ["--device", "cuda:0"],
            "--device: cuda:0 requested but no CUDA GPU is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU"),
        ),
    ],
)
def test_bad_values_name_the_flag(home: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str):
    from trainer.cli import main

    with pytest.raises(SystemExit) as exc:
        main([*TINY, *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    with sqlite3.connect(home / "stepscope.db") as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_config_file_with_flag_override(home: Path, tmp_path: Path) -> None:
    from trainer.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny-random-llama\nlearning_rate: 0.002\nmax_steps: 3\nname: from-yaml\n")
    assert main(["--config", str(cfg), "--max-steps", "4"]) == 0
    run = run_row(home)
    assert run["name"] == "from-yaml" and run["learning_rate"] == 0.002 and run["steps_done"] == 4


def test_a_writer_failure_ends_the_run_failed_and_the_cli_says_why(home: Path) -> None:
    proc = start(home, *LONG)
    wait_for_steps(home, 5)
    with sqlite3.connect(home / "stepscope.db", timeout=30) as conn:
        conn.execute("ALTER TABLE step_rollups RENAME TO moved_away")  # the writer's next transaction fails
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "recording failed" in err and "Traceback" not in err
    run = run_row(home)
    assert run["status"] == "failed" and "step_rollups" in run["error"]  # written through a fresh connection
    assert run["finished_at"] is not None
