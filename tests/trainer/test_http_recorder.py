"""The engine recording over HTTP (`python -m trainer --run-id N --server URL`) into a real server, and the
ingest API's /job route that takes a built-in run's own columns."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from sqlmodel import Session

from app.config import Settings
from app.main import create_app
from app.services import create_run
from store.db import make_engine
from store.settings import home_id
from tests.browser.conftest import REPO, serve
from tests.conftest import free_port
from trainer.config import TrainConfig
from trainer.http_recorder import _coalesce

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-lookup", "eval_every": 10, "checkpoint_every": 0}


def queue_run(settings: Settings, **config: object) -> int:
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        run_id = create_run(session, TrainConfig(**(TINY | config))).id
    engine.dispose()
    assert run_id is not None
    return run_id


def test_a_job_given_a_server_url_records_every_step_over_http(settings: Settings, home: Path) -> None:
    run_id = queue_run(settings, max_steps=30, probe_every=10, module_norms_every=10, loraplus_lr_ratio=16)
    # A Ray executor whose cluster nobody answers: the server starts no job itself, the run waits for ours.
    with serve(home, executor="ray", ray_address=f"http://127.0.0.1:{free_port()}") as server:
        done = remote_job(run_id, server.url, STEPSCOPE_SERVER_ID=home_id(home))  # as a Ray job on this machine
        assert done.returncode == 0, done.stderr
    assert "go to the server" not in done.stderr  # the server's own data directory: nothing to send
    with sqlite3.connect(settings.db_path) as conn:
        status, total, steps_done, summary = conn.execute(
            "SELECT status, total_steps, steps_done, summary FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        steps = [r[0] for r in conn.execute("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", (run_id,))]
        evals = conn.execute("SELECT count(*) FROM eval_metrics WHERE run_id = ?", (run_id,)).fetchone()[0]
        probes = [r[0] for r in conn.execute("SELECT step FROM probe_curves WHERE run_id = ? ORDER BY step", (run_id,))]
        norms = [r[0] for r in conn.execute("SELECT step FROM module_norms WHERE run_id = ? ORDER BY step", (run_id,))]
        tensors, last_loss = conn.execute("SELECT lora_tensors, last_loss FROM runs WHERE id = ?", (run_id,)).fetchone()
        sql = "SELECT key, count(*) FROM scalar_metrics WHERE run_id = ? AND key LIKE 'lr/%' GROUP BY key"
        rates = dict(conn.execute(sql, (run_id,)))
        answers = conn.execute("SELECT step, count(*) FROM generations WHERE run_id = ? GROUP BY step", (run_id,))
        answered = answers.fetchall()
        sql = "SELECT step FROM scalar_metrics WHERE run_id = ? AND key = 'eval/exact_match' ORDER BY step"
        accuracy_steps = [r[0] for r in conn.execute(sql, (run_id,))]
    assert (status, total, steps_done) == ("completed", 30, 30) and summary is not None
    assert steps == list(range(1, 31)) and evals == 3
    # the walk (issue 13) over HTTP too: probes, module norms with their tensors' names, LoRA+'s two rates
    assert probes == norms == [1, 10, 20, 30] and len(json.loads(tensors)) == 16
    assert rates == {"lr/A": 30, "lr/B": 30} and last_loss is not None  # rate-only rows leave the loss alone
    assert answered == [(10, 8), (20, 8), (30, 8)] and accuracy_steps == [10, 20, 30]  # answers and accuracy too


def remote_job(run_id: int, server: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m trainer --run-id N --server URL`, as the Ray executor submits it."""
    return subprocess.run(
        [sys.executable, "-m", "trainer", "--run-id", str(run_id), "--server", server],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=os.environ | env,
    )  # fmt: skip


def test_a_job_on_a_node_of_its_own_sends_the_files_the_server_reads(
    settings: Settings, home: Path, tmp_path: Path
) -> None:
    run_id = queue_run(settings, max_steps=30, checkpoint_every=10, map_snapshots=4)
    node = tmp_path / "node"  # a worker's own data directory (STEPSCOPE_JOB_HOME), not the server's
    with serve(home, executor="ray", ray_address=f"http://127.0.0.1:{free_port()}") as server:
        done = remote_job(run_id, server.url, STEPSCOPE_JOB_HOME=str(node), STEPSCOPE_SERVER_ID=home_id(home))
        assert done.returncode == 0, done.stderr
    assert "the run's files go to the server" in done.stderr
    kept, sent = node / "runs" / str(run_id), settings.runs_dir / str(run_id)
    names = sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file())
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "snapshots.pt"} <= set(names)
    assert [n for n in names if n.startswith("checkpoints/")] == [
        "checkpoints/step-000000010/state.pt", "checkpoints/step-000000020/state.pt"
    ]  # fmt: skip
    for name in names:
        assert (sent / name).read_bytes() == (kept / name).read_bytes(), name
    assert not (node / "stepscope.db").exists()  # rows went over HTTP: no database of its own


def test_the_job_route_takes_a_built_in_runs_columns_and_nothing_else(settings: Settings) -> None:
    run_id = queue_run(settings, max_steps=5)
    with TestClient(create_app(settings, run_jobs=False)) as client:
        answer = client.post(f"/api/runs/{run_id}/job", json={"fields": {"status": "running", "total_steps": 5}})
        assert answer.status_code == 200 and answer.json()["total_steps"] == 5
        bad = client.post(f"/api/runs/{run_id}/job", json={"fields": {"config": {}}})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "fields", "config"]
        assert client.post(f"/api/runs/{run_id}/job", json={"fields": {"steps_done": -1}}).status_code == 422
        assert client.post(f"/api/runs/{run_id}/job", json={"fields": {"status": "completed"}}).status_code == 200
        assert client.post(f"/api/runs/{run_id}/job", json={"fields": {"steps_done": 5}}).status_code == 409
        external = client.post("/api/external-runs", json={"name": "script"}).json()["id"]
        assert client.post(f"/api/runs/{external}/job", json={"fields": {"steps_done": 1}}).status_code == 409


def test_requests_in_a_row_are_sent_as_few_in_order() -> None:
    batches = [("job", {"a": 1}), ("steps", [1]), ("steps", [2]), ("job", {"a": 2}), ("job", {"b": 3}), ("evals", [9])]
    assert _coalesce(batches) == [("job", {"a": 1}), ("steps", [1, 2]), ("job", {"a": 2, "b": 3}), ("evals", [9])]
