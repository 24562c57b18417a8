"""STEPSCOPE_EXECUTOR=ray with a cluster nobody answers: nothing is queued, the API says 503 with the reason and
the form shows it (with the values kept). No Ray cluster needed: the address is a closed port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from bs4 import BeautifulSoup
from fastapi.testclient import TestClient
from sqlmodel import Session, func, select

from app.config import Settings
from app.main import create_app
from store.db import make_engine
from store.tables import Run
from tests.app.test_pages import form_values, page, text
from tests.conftest import free_port

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-lookup", "max_steps": 5}


@pytest.fixture
def client(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("STEPSCOPE_EXECUTOR", "ray")
    monkeypatch.setenv("STEPSCOPE_RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    with TestClient(create_app(Settings(), run_jobs=False)) as client:
        yield client


def runs(home: Path) -> int:
    engine = make_engine(f"sqlite:///{home / 'stepscope.db'}")
    with Session(engine) as session:
        count: int = session.exec(select(func.count()).select_from(Run)).one()
    engine.dispose()
    return count


def test_the_api_answers_503_with_the_reason(client: TestClient, home: Path) -> None:
    for path, body in (
        ("/api/runs", TINY),
        ("/api/sweeps", {"config": TINY, "learning_rates": [1e-3, 1e-2]}),
        ("/api/lr-range-tests", {"model": "tiny-random-llama"}),
    ):
        answer = client.post(path, json=body)
        assert answer.status_code == 503, (path, answer.text)
        assert "Ray" in answer.json()["detail"] or "ray" in answer.json()["detail"]
    assert runs(home) == 0


def test_the_form_shows_why_nothing_was_queued(client: TestClient, home: Path) -> None:
    values = form_values(page(client, "/runs/new")) | {"name": "on the cluster", "max_steps": "5"}
    answer = client.post("/runs/new", data=values)
    assert answer.status_code == 200
    soup = BeautifulSoup(answer.text, "html.parser")
    alert = text(soup.select_one("div.alert .error"))
    assert alert.startswith("Nothing was queued:") and ("cannot be reached" in alert or "ray extra" in alert)
    assert form_values(soup)["name"] == "on the cluster"
    assert runs(home) == 0
