"""Checkpoints and resume: a run killed mid-way goes on from its last checkpoint as if it had never stopped."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.trainer.conftest import TINY, run_row, steps
from tests.trainer.test_cli import start
from trainer import checkpoints

# CPU and fp32, so that two processes compute the same floats; AdamW, so that its moments must be restored too.
FLAGS = [*TINY, "--max-steps", "400", "--checkpoint-every", "50", "--eval-every", "100", "--optimizer", "adamw",
         "--learning-rate", "3e-3", "--device", "cpu", "--precision", "fp32", "--seed", "11"]  # fmt: skip
COMPARED = ("loss", "grad_norm", "update_norm", "lr", "grad_alignment", "update_cos", "samples", "tokens")


def wait_for_steps(home: Path, run_id: int, n: int) -> None:
    wait_for(
        lambda: len(steps(home, run_id)) >= n, 120, f"run {run_id} to record {n} steps", (sqlite3.OperationalError,)
    )


def finish(home: Path, *args: str) -> int:
    proc = start(home, *args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 2, 3, 4), err
    return proc.returncode


def test_a_killed_run_resumes_from_its_checkpoint_with_the_same_steps(home: Path) -> None:
    assert finish(home, *FLAGS) == 0  # run 1: never stopped
    proc = start(home, *FLAGS)  # run 2: killed after its third checkpoint
    wait_for_steps(home, 2, 170)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert run_row(home, 2)["status"] == "running"  # nobody could record its end
    saved = checkpoints.latest(home / "runs" / "2")
    assert saved is not None and saved.name == "step-000000150"
    assert len(list((home / "runs" / "2" / "checkpoints").glob("step-*"))) == checkpoints.CHECKPOINT_KEEP
    recorded = [r["step"] for r in steps(home, 2)]
    assert max(recorded) > 150  # rows after the checkpoint: the resumed run writes them again

    assert finish(home, "--resume", "2") == 0
    run, first, resumed = run_row(home, 2), steps(home, 1), steps(home, 2)
    assert run["status"] == "completed" and run["steps_done"] == 400
    assert [r["step"] for r in resumed] == list(range(1, 401))  # every step exactly once
    for a, b in zip(first, resumed, strict=True):
        for key in COMPARED:  # the cosines are None at step 1: no update before it
            assert (b[key] is None) == (a[key] is None), (a["step"], key)
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert run_row(home, 1)["summary"] is not None and run["verdict"] == run_row(home, 1)["verdict"]
    assert (home / "runs" / "2" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_server_shutdown_checkpoints_and_only_an_interrupted_run_resumes(home: Path) -> None:
    proc = start(home, *FLAGS[:-2], "--seed", "12", "--max-steps", "100000")
    wait_for_steps(home, 1, 30)
    proc.send_signal(signal.SIGUSR1)  # what the job runner sends when the server stops
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    run = run_row(home, 1)
    assert run["status"] == "interrupted"
    saved = checkpoints.latest(home / "runs" / "1")
    assert saved is not None and int(saved.name.removeprefix("step-")) == run["steps_done"]

    completed = start(home, *TINY, "--max-steps", "5", "--eval-every", "0")
    completed.communicate(timeout=120)
    refused = start(home, "--resume", "2")
    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "--resume: run 2 is completed" in err
    again = start(home, "--resume", "1")  # it goes on (a cancel then stops it: the test needs only its start)
    wait_for_steps(home, 1, run["steps_done"] + 5)
    again.send_signal(signal.SIGTERM)
    again.communicate(timeout=60)
    rows = [r["step"] for r in steps(home, 1)]
    assert rows == list(range(1, len(rows) + 1)) and run_row(home, 1)["status"] == "cancelled"


@pytest.mark.parametrize(
    "flags",
    [
        ["--optimizer", "sgd", "--momentum", "0.9", "--scheduler", "cosine", "--warmup-steps", "2"],
        ["--optimizer", "adamw", "--scheduler", "constant_with_warmup", "--warmup-steps", "2"],
        ["--optimizer", "adamw", "--scheduler", "linear", "--loraplus-lr-ratio", "16"],
    ],
)
def test_every_checkpoint_loads_as_plain_tensors(home: Path, flags: list[str]) -> None:
    """checkpoints.load refuses pickled objects (a checkpoint may come over HTTP from another node): every
    optimizer, schedule and LoRA+'s groups must save as tensors, numbers and dicts only."""
    assert finish(home, *TINY, "--max-steps", "6", "--checkpoint-every", "3", "--eval-every", "0", *flags) == 0
    found = checkpoints.latest(home / "runs" / "1")
    assert found is not None and found.name == "step-000000003"
    state = checkpoints.load(found)  # weights_only=True: an UnpicklingError otherwise
    assert state["step"] == 3 and state["scheduler"]["last_epoch"] == 3 and state["trainable"]
    assert state["optimizer"]["state"]  # AdamW's moments, SGD's momentum buffers
