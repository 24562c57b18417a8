"""The server as a process: `stepscope serve` killed and restarted while jobs run, and live events."""

from __future__ import annotations

import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.config import Settings
from app.main import create_app
from store.db import configure_sqlite
from store.tables import STEP_COLUMNS
from tests import conftest
from tests.conftest import free_port, step_row

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic", "eval_every": 0}


# A server that is starting or restarting refuses connections: that counts as not yet.
wait_for = functools.partial(conftest.wait_for, retry_on=(httpx.TransportError,))


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


class Server:
    """`python -m app.cli serve` on a free loopback port, with its output in a log file."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STEPSCOPE_MAX_CONCURRENT_RUNS": "1", "STEPSCOPE_CANCEL_GRACE_SECONDS": "10"}
        self.log = log.open("ab")
        command = [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: httpx.get(f"{self.url}/api/health").status_code == 200, 60, "the server to start")

    def run(self, run_id: int) -> dict[str, Any]:
        state: dict[str, Any] = httpx.get(f"{self.url}/api/runs/{run_id}").json()
        return state

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def servers(settings: Settings, tmp_path: Path) -> Iterator[Callable[[], Server]]:
    started: list[Server] = []

    def start() -> Server:
        started.append(Server(tmp_path / "server.log"))
        return started[-1]

    yield start
    for server in started:
        server.close()


def job_pid(settings: Settings, run_id: int) -> int:
    with sqlite3.connect(settings.db_path) as conn:
        pid: int = conn.execute("SELECT pid FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    return pid


def test_killing_and_restarting_the_server_leaves_no_run_running(
    settings: Settings, servers: Callable[[], Server], tmp_path: Path
) -> None:
    first = servers()
    long_run = httpx.post(f"{first.url}/api/runs", json={**TINY, "max_steps": 100_000}, timeout=60).json()["id"]
    short_run = httpx.post(f"{first.url}/api/runs", json={**TINY, "max_steps": 25}, timeout=60).json()["id"]
    wait_for(lambda: first.run(long_run)["steps_done"] >= 3, 90, "the first job to train")
    assert first.run(short_run)["status"] == "queued"

    # The machine goes down hard: the server and its job die without writing anything.
    pid = job_pid(settings, long_run)
    first.proc.kill()
    os.kill(pid, signal.SIGKILL)
    first.proc.wait()
    wait_for(lambda: not process_alive(pid), 10, "the job to die")

    second = servers()
    gone = second.run(long_run)
    assert gone["status"] == "interrupted" and "process was gone" in gone["error"]
    assert gone["steps_done"] >= 3  # its rows stay

    # The queued run resumes queueing; follow it live until it ends.
    with httpx.stream("GET", f"{second.url}/api/runs/{short_run}/events", timeout=120) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    steps = [s for e in events if "steps" in e and "loss" in e["series"] for s in e["steps"]]
    assert steps == list(range(1, 26))
    assert [e["status"] for e in events if "status" in e][-1] == "completed"
    assert second.run(short_run)["status"] == "completed"

    # A clean stop (SIGTERM, as from systemd or Ctrl-C) stops the job it runs, never leaving it running.
    third_run = httpx.post(f"{second.url}/api/runs", json={**TINY, "max_steps": 100_000}, timeout=60).json()["id"]
    wait_for(lambda: second.run(third_run)["steps_done"] >= 3, 90, "the third job to train")
    pid = job_pid(settings, third_run)
    second.proc.send_signal(signal.SIGTERM)
    second.proc.wait(timeout=30)  # uvicorn re-raises the signal after its shutdown: the code is -15
    assert b"Application shutdown complete" in (tmp_path / "server.log").read_bytes()
    assert not process_alive(pid)
    with sqlite3.connect(settings.db_path) as conn:
        statuses = dict(conn.execute("SELECT id, status FROM runs").fetchall())
    assert statuses[third_run] == "interrupted"  # the server's shutdown is no user's cancel
    assert "running" not in statuses.values()


def test_events_deliver_a_new_step_within_a_second(settings: Settings) -> None:
    app = create_app(settings, run_jobs=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn")
    url = f"http://127.0.0.1:{server.config.port}"
    conn = sqlite3.connect(settings.db_path, isolation_level=None)
    configure_sqlite(conn)
    try:
        run_id = conn.execute(
            "INSERT INTO runs (name, kind, status, model, dataset, learning_rate, batch_size, optimizer, config, "
            "created_at, steps_done) VALUES ('live', 'train', 'running', 'm', 'd', 0.001, 8, 'adamw', '{}', "
            "'2026-01-01 00:00:00.000000', 0)"
        ).lastrowid
        marks = ", ".join("?" * (len(STEP_COLUMNS) + 2))
        insert = f"INSERT INTO step_metrics (run_id, step, {', '.join(STEP_COLUMNS)}) VALUES ({marks})"
        received: list[tuple[float, dict[str, Any]]] = []

        def listen() -> None:
            with httpx.stream("GET", f"{url}/api/runs/{run_id}/events", timeout=30) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        received.append((time.monotonic(), json.loads(line[6:])))

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        wait_for(lambda: received, 10, "the first status event")
        latencies = []
        for step in range(1, 4):
            written = time.monotonic()
            conn.execute(insert, step_row(run_id, step, 2.0 / step))
            wait_for(lambda s=step: any(e.get("steps") == [s] for _, e in received), 5, f"step {step}")
            arrived = next(t for t, e in received if e.get("steps") == [step])
            latencies.append(arrived - written)
        conn.execute("UPDATE runs SET status = 'completed' WHERE id = ?", (run_id,))
        listener.join(10)
        assert not listener.is_alive()  # the stream ends once the run has finished
        assert max(latencies) < 1.0, latencies
        assert received[0][1]["status"] == "running" and received[-1][1]["status"] == "completed"
    finally:
        conn.close()
        server.should_exit = True
        thread.join(10)


# CPU and fp32, so that two processes compute the same floats (as tests/trainer/test_resume.py); AdamW, so
# that its moments must come back from the checkpoint too.
RESUMABLE = {**TINY, "max_steps": 200, "checkpoint_every": 40, "eval_every": 100, "optimizer": "adamw",
             "learning_rate": 3e-3, "device": "cpu", "precision": "fp32", "seed": 11}  # fmt: skip
COMPARED = ("loss", "grad_norm", "update_norm", "lr", "samples", "tokens")


def step_rows(settings: Settings, run_id: int) -> list[sqlite3.Row]:
    with sqlite3.connect(settings.db_path) as conn:
        conn.row_factory = sqlite3.Row
        sql = f"SELECT step, {', '.join(COMPARED)} FROM step_metrics WHERE run_id = ? ORDER BY step"
        return conn.execute(sql, (run_id,)).fetchall()


def test_a_run_resumed_after_the_server_was_killed_matches_one_never_stopped(
    settings: Settings, servers: Callable[[], Server]
) -> None:
    first = servers()
    never_stopped = httpx.post(f"{first.url}/api/runs", json=RESUMABLE, timeout=60).json()["id"]
    stopped = httpx.post(f"{first.url}/api/runs", json=RESUMABLE, timeout=60).json()["id"]
    wait_for(lambda: first.run(never_stopped)["status"] == "completed", 300, "the first run to complete")
    wait_for(lambda: first.run(stopped)["steps_done"] >= 60, 120, "the second run to pass a checkpoint")

    # The machine goes down hard: the server and its job die at once.
    pid = job_pid(settings, stopped)
    first.proc.kill()
    os.kill(pid, signal.SIGKILL)
    first.proc.wait()
    wait_for(lambda: not process_alive(pid), 10, "the job to die")

    second = servers()
    assert second.run(stopped)["status"] == "interrupted"
    resumed = httpx.post(f"{second.url}/api/runs/{stopped}/resume", timeout=60)
    assert resumed.status_code == 200, resumed.text
    wait_for(lambda: second.run(stopped)["steps_done"] >= 110, 120, "the resumed run to train")

    # Now only the server dies: its job goes on alone, and the next server watches it to its end.
    pid = job_pid(settings, stopped)
    second.proc.kill()
    second.proc.wait()
    assert process_alive(pid)
    third = servers()
    wait_for(lambda: third.run(stopped)["status"] == "completed", 120, "the resumed run to complete")

    reference, got = step_rows(settings, never_stopped), step_rows(settings, stopped)
    assert [r["step"] for r in got] == list(range(1, 201))  # every step exactly once
    for a, b in zip(reference, got, strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert third.run(stopped)["verdict"] == third.run(never_stopped)["verdict"]
