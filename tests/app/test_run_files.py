"""A run's files over HTTP (app.routers.run_files): what a job on a node without the server's data directory
sends (adapter, checkpoints, snapshots) and fetches back when resumed elsewhere; the same files a local job
writes, in the same places, and nothing else."""

from __future__ import annotations

import http.client
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from trainer import checkpoints

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_jobs=False)) as client:
        yield client


@pytest.fixture
def run_id(client: TestClient, db: sqlite3.Connection) -> int:
    created = client.post("/api/runs", json=TINY | {"max_steps": 5})
    assert created.status_code == 201, created.text
    db.execute("UPDATE runs SET status = 'running' WHERE id = ?", (created.json()["id"],))
    return int(created.json()["id"])


def checkpoint(step: int) -> str:
    return f"checkpoints/step-{step:09d}/state.pt"


def test_sent_files_land_where_a_local_job_writes_them_and_come_back(
    client: TestClient, settings: Settings, run_id: int
) -> None:
    run_dir = settings.runs_dir / str(run_id)
    for path, data in (("adapter/adapter_model.safetensors", b"weights"), ("snapshots.pt", b"snaps")):
        sent = client.put(f"/api/runs/{run_id}/files/{path}", content=data)
        assert sent.status_code == 200 and sent.json() == {"path": path, "bytes": len(data)}
        assert (run_dir / path).read_bytes() == data
    for step in (10, 20, 30):  # kept like local checkpoints: the newest CHECKPOINT_KEEP
        assert client.put(f"/api/runs/{run_id}/files/{checkpoint(step)}", content=b"state %d" % step).status_code == 200
    assert checkpoints.latest(run_dir) == run_dir / "checkpoints" / "step-000000030"
    assert len(list((run_dir / "checkpoints").iterdir())) == checkpoints.CHECKPOINT_KEEP
    assert not [p for p in run_dir.rglob(".*")]  # no temporary file left behind

    listed = client.get(f"/api/runs/{run_id}/files").json()["files"]
    assert [f["path"] for f in listed] == [
        "adapter/adapter_model.safetensors", checkpoint(20), checkpoint(30), "snapshots.pt"
    ]  # fmt: skip
    assert client.get(f"/api/runs/{run_id}/files/{checkpoint(30)}").content == b"state 30"
    (run_dir / "stderr.log").write_text("not a run file")
    assert "stderr.log" not in [f["path"] for f in client.get(f"/api/runs/{run_id}/files").json()["files"]]


@pytest.mark.parametrize(
    "path",
    [
        "checkpoints/step-1/state.pt",
        "checkpoints/step-000000001/x.pt",
        "stderr.log",
        "adapter/.hidden",
        "adapter/",
        "adapter/adapter_model.bin",
    ],
)
def test_a_path_that_is_not_a_run_file_is_a_422_naming_it(client: TestClient, run_id: int, path: str) -> None:
    for answer in (client.put(f"/api/runs/{run_id}/files/{path}", content=b"x"),
                   client.get(f"/api/runs/{run_id}/files/{path}")):  # fmt: skip
        assert answer.status_code == 422, (path, answer.text)
        (detail,) = answer.json()["detail"]
        assert detail["loc"] == ["path", "path"] and "not a run file" in detail["msg"]


def test_a_path_out_of_the_run_s_folder_is_refused_by_a_real_server(settings: Settings, home: Path) -> None:
    """`..` as sent on the wire (HTTP clients, the test client too, normalise it away; a hand-made request
    need not): uvicorn hands it to the route as it is."""
    from tests.browser.conftest import serve

    with serve(home) as server:
        created = json.loads(_raw(server.url, "POST", "/api/runs", json.dumps(TINY | {"max_steps": 5}).encode())[1])
        for path in ("../../stepscope.db", "adapter/../../../stepscope.db", "../1/snapshots.pt"):
            for method in ("PUT", "GET"):
                code, body = _raw(server.url, method, f"/api/runs/{created['id']}/files/{path}", b"overwritten")
                assert code == 422 and "not a run file" in body, (method, path, code, body)
    assert settings.db_path.read_bytes()[:15] == b"SQLite format 3"


def _raw(url: str, method: str, path: str, body: bytes) -> tuple[int, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body if method != "GET" else None, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def test_an_ended_run_takes_no_files_and_a_missing_one_is_a_404(
    client: TestClient, db: sqlite3.Connection, run_id: int
) -> None:
    assert client.get(f"/api/runs/{run_id}/files/snapshots.pt").status_code == 404
    assert client.put(f"/api/runs/{run_id + 1}/files/snapshots.pt", content=b"x").status_code == 404
    db.execute("UPDATE runs SET status = 'completed' WHERE id = ?", (run_id,))
    answer = client.put(f"/api/runs/{run_id}/files/snapshots.pt", content=b"late")
    assert answer.status_code == 409 and "already finished" in answer.json()["detail"]


def test_a_file_over_the_upload_limit_is_a_413_and_leaves_nothing(settings: Settings, db: sqlite3.Connection) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small, run_jobs=False)) as client:
        created = client.post("/api/runs", json=TINY | {"max_steps": 5}).json()["id"]
        db.execute("UPDATE runs SET status = 'running' WHERE id = ?", (created,))
        answer = client.put(f"/api/runs/{created}/files/snapshots.pt", content=b"x" * (1 << 20))
        assert answer.status_code == 413
        run_dir = small.runs_dir / str(created)
        assert list(run_dir.iterdir()) == []  # refused while read: the partial file was removed
