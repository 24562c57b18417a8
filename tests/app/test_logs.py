"""A run's job log through the executor (GET /api/runs/{id}/logs) and the run page's log section: a real
tiny-model job's stderr, read back whole and by its last lines; bad `tail` values are 422s naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from bs4 import BeautifulSoup
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import wait_for

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic", "eval_every": 5, "max_steps": 10}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(max_concurrent_runs=1))) as client:
        yield client


def ended(client: TestClient, run_id: int) -> dict[str, Any] | None:
    run: dict[str, Any] = client.get(f"/api/runs/{run_id}").json()
    return run if run["status"] not in ("queued", "running") else None


def test_the_api_returns_the_log_of_a_real_local_job(client: TestClient, settings: Settings) -> None:
    run_id = client.post("/api/runs", json=TINY).json()["id"]
    run = wait_for(lambda: ended(client, run_id), 120, "the run to end")
    assert run["status"] == "completed", run["error"]

    answer = client.get(f"/api/runs/{run_id}/logs")
    assert answer.status_code == 200
    body = answer.json()
    assert body["run_id"] == run_id and body["executor"] == "local" and body["job"] is None  # its row says it all
    stderr = (settings.runs_dir / str(run_id) / "stderr.log").read_text()
    shown = [line for line in stderr.split("\n") if line.strip()]
    assert body["lines"] == [line.rstrip() for line in shown][-200:]  # the job's own lines, oldest first
    assert any("training examples" in line for line in body["lines"])

    last_two = client.get(f"/api/runs/{run_id}/logs", params={"tail": 2}).json()["lines"]
    assert last_two == body["lines"][-2:] and len(last_two) == 2


def test_a_run_without_a_job_has_no_log_lines(settings: Settings) -> None:
    with TestClient(create_app(settings, run_jobs=False)) as client:
        queued = client.post("/api/runs", json=TINY).json()["id"]
        assert client.get(f"/api/runs/{queued}/logs").json()["lines"] == []
        external = client.post("/api/external-runs", json={"name": "my script"}).json()["id"]
        (settings.runs_dir / str(external)).mkdir(parents=True)
        (settings.runs_dir / str(external) / "stderr.log").write_text("not this run's: it has no job\n")
        assert client.get(f"/api/runs/{external}/logs").json()["lines"] == []
        assert client.get("/api/runs/999/logs").status_code == 404


@pytest.mark.parametrize("tail", ["0", "-3", "5001", "many"])
def test_a_bad_tail_is_a_422_naming_the_field(settings: Settings, tail: str) -> None:
    with TestClient(create_app(settings, run_jobs=False)) as client:
        run_id = client.post("/api/runs", json=TINY).json()["id"]
        answer = client.get(f"/api/runs/{run_id}/logs", params={"tail": tail})
    assert answer.status_code == 422
    (problem,) = answer.json()["detail"]
    assert problem["loc"] == ["query", "tail"] and problem["msg"]


def test_the_run_page_has_a_closed_log_section(settings: Settings) -> None:
    with TestClient(create_app(settings, run_jobs=False)) as client:
        run_id = client.post("/api/runs", json=TINY).json()["id"]
        soup = BeautifulSoup(client.get(f"/runs/{run_id}").text, "html.parser")
    details = soup.select_one("details#job-log")
    assert details is not None and not details.has_attr("open")  # read only when a person opens it
    summary = details.select_one("summary")
    assert summary is not None and summary.get_text(" ", strip=True).startswith("Log")
    assert details.select_one("pre#job-log-lines") is not None
