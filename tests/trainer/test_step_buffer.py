"""StepBuffer's collector thread, which on a GPU delivers a copy the moment its event fires.

There is no GPU here, so the copies carry a stand-in for `torch.cuda.Event` whose landing the test
decides (`record` and `synchronize`, as CUDA's event has them); everything else is the real
StepBuffer on CPU tensors, with the loop's own `record` and a real recorder behind it.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from typing import Any

import pytest
import torch

from app.config import Settings
from tests.conftest import wait_for
from trainer.config import TrainConfig
from trainer.loop import DivergenceGuard, History, Problem, StepBuffer, record
from trainer.recorder import Recorder, new_run

Rows = tuple[list[Any], list[Any]]


class Landing:
    """Lands when the test says so; `synchronize` sleeps until then, as a blocking CUDA event does."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        assert self.done.wait(30), "the copy never landed"


class GpuLikeBuffer(StepBuffer):
    """A StepBuffer whose copies land when the test lands them, as a GPU's land while the loop goes on."""

    def __init__(self, deliver: Any) -> None:
        super().__init__(torch.device("cpu"), deliver)
        self.landings: list[Landing] = []

    def _event(self) -> Landing:
        self.landings.append(Landing())
        return self.landings[-1]


def _step(buffer: StepBuffer, step: int, loss: float = 2.0) -> None:
    values = [torch.tensor(v, device=buffer.device) for v in (loss, 1.0, 0.01, 10.0, 0.5, 0.1)]
    buffer.add(values, (step, step / 10, 4 * step, 64 * step, 1e-3, 0.1 * step, 0.1))
    buffer.start_copy()


def test_a_landed_copy_is_delivered_without_waiting_for_the_next_step() -> None:
    delivered: list[Rows] = []
    buffer = GpuLikeBuffer(lambda rows, evals: delivered.append((rows, evals)))
    _step(buffer, 1)
    assert buffer.collect() is None and delivered == []  # not landed: the loop goes on, nothing waits
    _step(buffer, 2)
    buffer.landings[0].done.set()  # the loop is busy with step 3 now; nobody calls collect
    wait_for(lambda: len(delivered) == 1)
    assert [row[0] for row in delivered[0][0]] == [1] and delivered[0][0][0][4] == 2.0
    buffer.landings[1].done.set()
    wait_for(lambda: len(delivered) == 2)
    assert [rows[0][0][0] for rows in delivered] == [1, 2]  # oldest first, each once
    assert buffer.collect(wait=True) is None and len(delivered) == 2


def test_wait_delivers_everything_before_it_returns() -> None:
    delivered: list[int] = []
    buffer = GpuLikeBuffer(lambda rows, evals: delivered.extend(r[0] for r in rows))
    for step in (1, 2, 3):
        _step(buffer, step)
    threading.Timer(0.2, lambda: [landing.done.set() for landing in buffer.landings]).start()
    assert buffer.collect(wait=True) is None
    assert delivered == [1, 2, 3]


def test_a_divergence_reaches_the_loop_and_later_copies_are_dropped(settings: Settings) -> None:
    run_id = new_run(settings.database_url, TrainConfig(model="tiny-random-llama"))
    recorder, history = Recorder(settings.db_path, run_id), History()
    deliver = functools.partial(record, guard=DivergenceGuard(), recorder=recorder, history=history)
    buffer = GpuLikeBuffer(deliver)
    _step(buffer, 1)
    _step(buffer, 2, loss=float("nan"))  # the guard stops the run here
    _step(buffer, 3)
    for landing in buffer.landings:
        landing.done.set()
    wait_for(lambda: list(history.steps) == [1, 2])
    problem: Problem | None = buffer.collect()
    assert problem is not None and problem[1] == 2 and "non-finite" in problem[0]
    _step(buffer, 4)  # a copy made after the divergence is not delivered either
    assert buffer.collect(wait=True) is None
    recorder.close()
    with sqlite3.connect(settings.db_path) as conn:
        steps = [r[0] for r in conn.execute("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", (run_id,))]
    assert steps == [1, 2] and list(history.steps) == [1, 2]


def test_a_failed_delivery_raises_in_the_loop() -> None:
    def deliver(rows: list[Any], evals: list[Any]) -> None:
        raise RuntimeError("recording failed: disk full")

    buffer = GpuLikeBuffer(deliver)
    _step(buffer, 1)
    buffer.landings[0].done.set()
    with pytest.raises(RuntimeError, match="disk full"):
        buffer.collect(wait=True)


def test_on_the_cpu_the_loop_delivers_in_collect_and_no_thread_runs() -> None:
    delivered: list[int] = []
    buffer = StepBuffer(torch.device("cpu"), lambda rows, evals: delivered.extend(r[0] for r in rows))
    before = threading.active_count()
    _step(buffer, 1)
    _step(buffer, 2)
    assert delivered == [] and threading.active_count() == before  # delivered by the loop, not behind its back
    assert buffer.collect() is None and delivered == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it)")
def test_on_a_gpu_a_copy_is_delivered_as_it_lands_while_the_loop_goes_on() -> None:
    delivered: list[int] = []
    buffer = StepBuffer(torch.device("cuda"), lambda rows, evals: delivered.extend(r[0] for r in rows))
    torch.cuda._sleep(1_000_000_000)  # the GPU stays busy (about half a second) before the copy can land
    _step(buffer, 1)
    assert delivered == []  # the loop did not wait for the GPU
    wait_for(lambda: delivered == [1], 30, "the copy to be delivered without a call from the loop")
    assert buffer.collect(wait=True) is None and delivered == [1]
