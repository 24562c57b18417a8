"""The ingest API: external runs, their step and eval batches (idempotent), custom metrics, finish, heartbeats."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from app.config import Settings
from app.main import create_app
from app.runner.recovery import settle_if_silent
from store.db import make_engine
from store.tables import Run, utcnow


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_jobs=False)) as client:
        yield client


def _run(client: TestClient, **body: object) -> int:
    answer = client.post("/api/external-runs", json={"name": "mine", "config": {"lr": 0.1, "layers": [1, 2]}, **body})
    assert answer.status_code == 201, answer.text
    run = answer.json()
    assert (run["status"], run["kind"], run["config"]["layers"]) == ("running", "external", [1, 2])
    return int(run["id"])


def _rows(first: int, n: int) -> list[dict[str, float]]:
    return [{"step": s, "loss": 3.0 - 0.01 * s, "lr": 1e-3, "accuracy": s / 100} for s in range(first, first + n)]


def test_steps_are_idempotent_and_custom_metrics_are_read(
    client: TestClient, db: sqlite3.Connection
) -> None:
    run_id = _run(client, learning_rate=1e-3)
    assert client.post(f"/api/runs/{run_id}/steps", json={"rows": _rows(1, 50)}).status_code == 200
    again = client.post(f"/api/runs/{run_id}/steps", json={"rows": _rows(41, 60)})  # overlaps: a retried batch
    assert again.json() == {"run_id": run_id, "rows": 60, "steps_done": 100}
    assert db.execute("SELECT count(*) FROM step_metrics WHERE run_id = ?", (run_id,)).fetchone() == (100,)
    assert db.execute("SELECT count(*) FROM scalar_metrics WHERE run_id = ?", (run_id,)).fetchone() == (100,)
    assert client.get(f"/api/runs/{run_id}/metric-keys").json()["custom"] == ["accuracy"]

    full = client.get(f"/api/runs/{run_id}/metrics", params={"keys": "loss,accuracy"}).json()
    assert full["steps"] == list(range(1, 101)) and full["series"]["accuracy"][9] == pytest.approx(0.1)
    spiky = [{"step": 70, "accuracy": 50.0}]  # a second call at a step keeps its loss
    client.post(f"/api/runs/{run_id}/steps", json={"rows": spiky})
    small = client.get(f"/api/runs/{run_id}/metrics", params={"keys": "loss,accuracy", "max_points": 20}).json()
    assert small["downsampled"] and len(small["steps"]) <= 20 and 50.0 in small["series"]["accuracy"]
    assert client.get(f"/api/runs/{run_id}/metrics", params={"keys": "nope"}).status_code == 422

    table = list(csv.DictReader(io.StringIO(client.get(f"/api/runs/{run_id}/metrics.csv").text)))
    assert len(table) == 100 and table[69]["accuracy"] == "50.0" and float(table[69]["loss"]) == pytest.approx(2.3)

    evals = client.post(f"/api/runs/{run_id}/evals", json={"rows": [{"step": 100, "eval_loss": 2.1, "eval_acc": 0.7}]})
    assert evals.status_code == 200
    done = client.post(f"/api/runs/{run_id}/finish", json={"status": "completed"}).json()
    assert done["status"] == "completed" and done["summary"]["n_steps"] == 100 and done["verdict"]
    assert done["last_eval_loss"] == 2.1 and done["summary"]["final_eval_loss"] is not None
    assert client.post(f"/api/runs/{run_id}/steps", json={"rows": _rows(1, 1)}).status_code == 409
    assert client.post(f"/api/runs/{run_id}/finish", json={}).status_code == 409
    assert client.delete(f"/api/runs/{run_id}").status_code == 204
    assert db.execute("SELECT count(*) FROM scalar_metrics").fetchone() == (0,)


@pytest.mark.parametrize(
    ("row", "where"),
    [
        ({"step": 1, "lr": float("inf")}, ["body", "rows", 0, "lr"]),
        ({"step": 1, "accuracy": float("nan")}, ["body", "rows", 0, "accuracy"]),
        ({"step": 1, "bad name!": 1.0}, ["body", "rows", 0, "bad name!"]),
        ({"step": -1}, ["body", "rows", 0, "step"]),
        ({"step": 1, "accuracy": "high"}, ["body", "rows", 0, "accuracy"]),
    ],
)
def test_bad_rows_get_a_422_naming_the_field(client: TestClient, row: dict, where: list) -> None:
    run_id = _run(client)
    content = json.dumps({"rows": [row]})  # NaN and Infinity as Python's json writes them
    answer = client.post(f"/api/runs/{run_id}/steps", content=content, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"][: len(where)] == where


def test_limits_unknown_runs_and_built_in_runs(client: TestClient) -> None:
    run_id = _run(client)
    too_many = [{"step": s} for s in range(10_001)]
    assert client.post(f"/api/runs/{run_id}/steps", json={"rows": too_many}).status_code == 422
    assert client.post("/api/runs/999/steps", json={"rows": []}).status_code == 404
    built_in = client.post("/api/runs", json={"model": "tiny-random-llama", "max_steps": 2}).json()["id"]
    assert client.post(f"/api/runs/{built_in}/steps", json={"rows": []}).status_code == 409
    body, headers = json.dumps({"config": {"x": float("inf")}}), {"content-type": "application/json"}
    assert client.post("/api/external-runs", content=body, headers=headers).status_code == 422


def test_a_silent_client_leaves_its_run_interrupted(client: TestClient, settings: Settings) -> None:
    run_id = _run(client, heartbeat_seconds=5)
    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        assert not settle_if_silent(engine, run, now=utcnow() + timedelta(seconds=2))
        assert settle_if_silent(engine, run, now=utcnow() + timedelta(seconds=10))
    engine.dispose()
    answer = client.get(f"/api/runs/{run_id}").json()
    assert answer["status"] == "interrupted" and "sent nothing" in answer["error"]
    assert client.post(f"/api/runs/{run_id}/heartbeat").status_code == 409
