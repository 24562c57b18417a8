"""The job runner: real training subprocesses with the tiny model, and stand-in jobs for the failure paths."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session

from app.config import Settings
from app.main import create_app
from app.runner import JobRunner
from app.services import cancel_run, create_run, resume_run
from store.db import make_engine
from store.processes import process_start_time
from store.tables import Run, RunStatus
from tests.conftest import wait_for
from trainer.config import TrainConfig

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic", "eval_every": 20}
FAKE_JOB = """
import os, signal, sqlite3, sys, time
run_id, mode = int(sys.argv[1]), sys.argv[2]
db = os.environ["STEPSCOPE_DATABASE_URL"].removeprefix("sqlite:///")
def set_status(status):
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("UPDATE runs SET status = ? WHERE id = ?", (status, run_id))
print("job", run_id, "gpu", os.environ.get("CUDA_VISIBLE_DEVICES"), file=sys.stderr, flush=True)
if mode == "crash":
    print("Traceback: boom, out of cheese", file=sys.stderr)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
set_status("running")
if mode == "complete":
    time.sleep(0.3)
    set_status("completed")
else:
    time.sleep(120)
"""


def count_rows(settings: Settings, table: str, run_id: int) -> int:
    with sqlite3.connect(settings.db_path) as conn:
        n: int = conn.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", (run_id,)).fetchone()[0]
    return n


# --- real training jobs ------------------------------------------------------------------------------------


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(Settings(max_concurrent_runs=1, cancel_grace_seconds=20))
    with TestClient(app) as client:
        yield client


def run_state(client: TestClient, run_id: int) -> dict[str, Any]:
    state: dict[str, Any] = client.get(f"/api/runs/{run_id}").json()
    return state


def finished(client: TestClient, run_id: int) -> dict[str, Any] | None:
    state = run_state(client, run_id)
    return state if state["status"] not in ("queued", "running") else None


def test_two_queued_runs_complete_one_after_the_other(client: TestClient, settings: Settings) -> None:
    first = client.post("/api/runs", json={**TINY, "max_steps": 40, "name": "first"}).json()["id"]
    second = client.post("/api/runs", json={**TINY, "max_steps": 30, "name": "second"}).json()["id"]
    wait_for(lambda: run_state(client, first)["status"] == "running", what="the first run to start")
    assert run_state(client, second)["status"] == "queued"  # MAX_CONCURRENT_RUNS=1

    a = wait_for(lambda: finished(client, first), 120, "the first run")
    b = wait_for(lambda: finished(client, second), 120, "the second run")
    assert (a["status"], b["status"]) == ("completed", "completed"), (a["error"], b["error"])
    assert a["finished_at"] <= b["started_at"]  # never at the same time
    assert (a["steps_done"], a["total_steps"], b["steps_done"]) == (40, 40, 30)
    assert a["device"] == "cpu" and a["trainable_params"] > 0 and a["last_loss"] > 0
    assert count_rows(settings, "step_metrics", first) == 40 and count_rows(settings, "step_metrics", second) == 30
    assert count_rows(settings, "eval_metrics", first) == 2  # steps 20 and 40
    metrics = client.get(f"/api/runs/{first}/metrics?keys=loss,eval_loss").json()
    assert metrics["steps"] == list(range(1, 41)) and all(v is not None for v in metrics["series"]["loss"])
    assert (settings.runs_dir / str(first) / "adapter" / "adapter_config.json").is_file()
    assert "training examples" in (settings.runs_dir / str(first) / "stderr.log").read_text()
    assert client.get("/api/health").json()["runs"] == {"completed": 2}


def test_cancel_mid_run_keeps_its_rows(client: TestClient, settings: Settings) -> None:
    run_id = client.post("/api/runs", json={**TINY, "max_steps": 100_000}).json()["id"]
    wait_for(lambda: run_state(client, run_id)["steps_done"] >= 5, what="some steps")

    response = client.post(f"/api/runs/{run_id}/cancel")
    assert response.status_code == 200 and response.json()["cancel_requested_at"] is not None
    run = wait_for(lambda: finished(client, run_id), 60, "the cancelled run to stop")
    assert run["status"] == "cancelled" and run["finished_at"] is not None
    assert run["steps_done"] >= 5
    assert count_rows(settings, "step_metrics", run_id) == run["steps_done"]  # nothing lost at the flush
    assert (settings.runs_dir / str(run_id) / "adapter" / "adapter_config.json").is_file()
    assert client.post(f"/api/runs/{run_id}/cancel").status_code == 409


def test_a_killed_job_ends_interrupted_with_its_stderr(client: TestClient, settings: Settings) -> None:
    run_id = client.post("/api/runs", json={**TINY, "max_steps": 100_000}).json()["id"]
    wait_for(lambda: run_state(client, run_id)["steps_done"] >= 3, what="some steps")
    with Session(make_engine(settings.database_url)) as session:
        pid = session.get(Run, run_id).pid  # type: ignore[union-attr]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does

    run = wait_for(lambda: finished(client, run_id), 30, "the runner to notice")
    assert run["status"] == "interrupted"  # a crash, not the run's fault: it can be resumed
    assert "killed by SIGKILL (out of memory?)" in run["error"]
    assert "training examples" in run["error"]  # the last lines of its stderr
    assert count_rows(settings, "step_metrics", run_id) >= 1  # rows flushed before the kill are kept


def test_a_killed_job_resumes_through_the_api_with_every_step_once(client: TestClient, settings: Settings) -> None:
    body = {**TINY, "max_steps": 300, "checkpoint_every": 50, "eval_every": 0}
    run_id = client.post("/api/runs", json=body).json()["id"]
    wait_for(lambda: run_state(client, run_id)["steps_done"] >= 120, what="two checkpoints")
    with Session(make_engine(settings.database_url)) as session:
        pid = session.get(Run, run_id).pid  # type: ignore[union-attr]
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: finished(client, run_id), 30, "the runner to notice")["status"] == "interrupted"
    assert client.post(f"/api/runs/{run_id}/resume").json()["status"] == "queued"
    run = wait_for(lambda: finished(client, run_id), 120, "the resumed run to finish")
    assert run["status"] == "completed" and run["steps_done"] == 300
    with sqlite3.connect(settings.db_path) as conn:
        recorded = [
            s for (s,) in conn.execute("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", (run_id,))
        ]
    assert recorded == list(range(1, 301))
    assert "resuming after step" in (settings.runs_dir / str(run_id) / "stderr.log").read_text()


def test_a_corrupt_dataset_fails_the_run_with_the_reason(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    with TestClient(create_app(settings, run_jobs=False)) as client:
        rows = b"".join(b'{"text": "line %d"}\n' % i for i in range(20))
        dataset = client.post("/api/datasets", files={"file": ("notes.jsonl", rows)}).json()
        run_id = client.post("/api/runs", json={**TINY, "dataset": dataset["filename"], "max_steps": 5}).json()["id"]
    (settings.datasets_dir / dataset["filename"]).write_bytes(b'{"text": "fine"}\n{not json\n')
    runner = JobRunner(settings, engine)
    runner.start()
    try:
        wait_for(lambda: read_run(engine, run_id).status == RunStatus.failed, 90, "the run to fail")
    finally:
        runner.stop()
    run = read_run(engine, run_id)
    assert "line 2" in (run.error or "") and "invalid JSON" in (run.error or "")


# --- stand-in jobs: the runner's own failure handling, without torch --------------------------------------


def read_run(engine: Engine, run_id: int) -> Run:
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run


def add_run(engine: Engine, **values: Any) -> int:
    with Session(engine) as session:
        run = Run(name="stand-in", config={"device": "auto"}, **values)
        session.add(run)
        session.commit()
        assert run.id is not None
        return run.id


@pytest.fixture
def fake(settings: Settings, tmp_path: Path) -> Iterator[tuple[Engine, Callable[..., JobRunner]]]:
    script = tmp_path / "fake_job.py"
    script.write_text(FAKE_JOB)
    engine = make_engine(settings.database_url)
    runners: list[JobRunner] = []

    def make(mode: str, **overrides: Any) -> JobRunner:
        runner_settings = settings.model_copy(update={"cancel_grace_seconds": 0.5, **overrides})
        runner = JobRunner(
            runner_settings, engine, command=lambda run_id: [sys.executable, str(script), str(run_id), mode]
        )
        runners.append(runner)
        return runner

    yield engine, make
    for runner in runners:
        runner.stop(timeout=2)


def test_a_job_that_exits_without_a_result_fails_with_its_stderr(fake: tuple[Engine, Callable[..., JobRunner]]) -> None:
    engine, make = fake
    run_id = add_run(engine)
    make("crash").start()
    wait_for(lambda: read_run(engine, run_id).status == RunStatus.failed, 20, "the crash")
    error = read_run(engine, run_id).error or ""
    assert "exited with code 3 without recording a result" in error
    assert "Traceback: boom, out of cheese" in error


def test_a_job_that_ignores_sigterm_is_killed_and_ends_cancelled(fake: tuple[Engine, Callable[..., JobRunner]]) -> None:
    engine, make = fake
    run_id = add_run(engine)
    runner = make("stubborn")
    runner.start()
    wait_for(lambda: read_run(engine, run_id).status == RunStatus.running, 20, "the job to start")
    pid = read_run(engine, run_id).pid
    with Session(engine) as session:
        assert cancel_run(session, run_id).status == RunStatus.running  # the job decides when it stops
    wait_for(lambda: read_run(engine, run_id).status == RunStatus.cancelled, 20, "SIGKILL after the grace period")
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert not runner.jobs


def test_a_run_resumed_as_soon_as_its_job_ended_is_started_again_not_settled_twice(
    fake: tuple[Engine, Callable[..., JobRunner]],
) -> None:
    """The poll that sees a job's end read the runs before settling it: a resume landing right after the settle
    (a user quick on the button) must not be taken for a run nobody watches and be ended again."""
    engine, make = fake
    run_id = add_run(engine)
    runner = make("sleep")  # polled by hand below: no thread, so the resume can land inside one poll
    runner.tick()
    wait_for(lambda: read_run(engine, run_id).status == RunStatus.running, 20, "the job to start")
    pid = read_run(engine, run_id).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: runner.executor.poll(runner.jobs[run_id]).ended, 20, "the job to die")
    settle = runner._settle

    def settle_then_resume(settled: int, interrupted: bool, reason: str) -> None:
        settle(settled, interrupted, reason)
        runner._settle = settle  # type: ignore[method-assign]
        with Session(engine) as session:
            assert resume_run(session, settled).status == RunStatus.queued

    runner._settle = settle_then_resume  # type: ignore[method-assign]
    runner.tick()
    run = read_run(engine, run_id)
    assert run.status == RunStatus.queued and run.error is None, run.error
    runner.tick()
    wait_for(lambda: read_run(engine, run_id).status == RunStatus.running, 20, "the second attempt to start")
    assert read_run(engine, run_id).pid not in (None, pid)
    os.kill(read_run(engine, run_id).pid or 0, signal.SIGKILL)


def test_queued_runs_start_oldest_first_on_free_gpus(
    fake: tuple[Engine, Callable[..., JobRunner]], monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    engine, make = fake
    monkeypatch.setattr("app.runner.gpus.detect_gpus", lambda: ["0", "1"])
    ids = [add_run(engine) for _ in range(3)]
    runner = make("sleep")  # max_concurrent_runs=0: one job per GPU
    runner.start()
    wait_for(lambda: [read_run(engine, i).status for i in ids] == ["running", "running", "queued"], 20, "two jobs")
    assert runner.max_concurrent == 2
    gpus = {(settings.runs_dir / str(i) / "stderr.log").read_text().split()[-1] for i in ids[:2]}
    assert gpus == {"0", "1"}
    with Session(engine) as session:
        cancel_run(session, ids[0])
    wait_for(lambda: read_run(engine, ids[2]).status == RunStatus.running, 20, "the third run to take the free GPU")
    assert (settings.runs_dir / str(ids[2]) / "stderr.log").read_text().split()[-1] == "0"


def test_resume_interrupted_at_start_queues_interrupted_runs_again(
    fake: tuple[Engine, Callable[..., JobRunner]],
) -> None:
    engine, make = fake
    interrupted = add_run(engine, status=RunStatus.interrupted, error="the server stopped")
    cancelled = add_run(engine, status=RunStatus.cancelled)
    first = make("complete")
    first.start()  # the setting off (the default): interrupted runs stay as they are
    time.sleep(1)
    assert read_run(engine, interrupted).status == RunStatus.interrupted
    first.stop(timeout=2)
    make("complete", resume_interrupted=True).start()
    wait_for(lambda: read_run(engine, interrupted).status == RunStatus.completed, 20, "the resumed run to end")
    assert read_run(engine, cancelled).status == RunStatus.cancelled  # a user's cancel is never resumed


def test_stopping_the_runner_leaves_no_run_running(fake: tuple[Engine, Callable[..., JobRunner]]) -> None:
    engine, make = fake
    run_id = add_run(engine)
    queued = add_run(engine)
    runner = make("stubborn", max_concurrent_runs=1)
    runner.start()
    wait_for(lambda: read_run(engine, run_id).status == RunStatus.running, 20, "the job to start")
    pid = read_run(engine, run_id).pid
    runner.stop(timeout=0.5)
    run = read_run(engine, run_id)
    assert run.status == RunStatus.interrupted and "server stopped" in (run.error or "")
    assert pid is not None and not Path(f"/proc/{pid}").exists()
    assert read_run(engine, queued).status == RunStatus.queued  # it waits for the next start


def test_at_start_runs_whose_process_is_gone_are_interrupted_and_live_ones_watched(
    fake: tuple[Engine, Callable[..., JobRunner]],
) -> None:
    engine, make = fake
    gone = add_run(engine, status=RunStatus.running, pid=2**22 + 12345)  # above Linux's default pid_max
    claimed = add_run(engine, pid=2**22 + 12346)  # claimed by a server that died before starting it
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "trainer"])
    alive = add_run(engine, status=RunStatus.running, pid=orphan.pid, pid_start=process_start_time(orphan.pid))
    runner = make("complete", max_concurrent_runs=2)
    try:
        runner.start()
        assert read_run(engine, gone).status == RunStatus.interrupted
        assert "process was gone" in (read_run(engine, gone).error or "")
        assert alive in runner.jobs and read_run(engine, alive).status == RunStatus.running
        wait_for(lambda: read_run(engine, claimed).status == RunStatus.completed, 20, "the re-queued run")
        orphan.kill()
        orphan.wait()
        wait_for(lambda: read_run(engine, alive).status == RunStatus.failed, 20, "the orphan's end")
    finally:
        orphan.kill()


def test_only_one_runner_per_data_directory(fake: tuple[Engine, Callable[..., JobRunner]]) -> None:
    engine, make = fake
    first, second = make("complete"), make("complete")
    first.start()
    second.start()
    assert first.active and not second.active
    first.stop()
    second.start()
    assert second.active


def test_create_run_validates_sources(settings: Settings) -> None:
    from trainer.config import ConfigError

    with Session(make_engine(settings.database_url)) as session:
        run = create_run(session, TrainConfig(**TINY, max_steps=9))  # type: ignore[arg-type]
        assert run.status == RunStatus.queued and run.total_steps == 9
        with pytest.raises(ConfigError) as err:
            create_run(session, TrainConfig(model="nope"))
        assert err.value.field == "model"
