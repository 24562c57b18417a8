"""The REST API, with the job runner switched off (no training here: see test_jobs.py)."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from analysis.smoothing import ema_smooth
from app.config import Settings
from app.main import create_app
from store.tables import STEP_COLUMNS
from tests.conftest import add_steps

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_jobs=False)) as client:
        yield client


def finish(db: sqlite3.Connection, run_id: int, status: str = "completed") -> None:
    db.execute("UPDATE runs SET status = ?, finished_at = '2026-01-01 00:00:00.000000' WHERE id = ?", (status, run_id))


def errors(response: object) -> dict[str, str]:
    """{'body.field': message} of a 422 answer."""
    detail = response.json()["detail"]  # type: ignore[attr-defined]
    return {".".join(str(p) for p in d["loc"]): d["msg"] for d in detail}


# --- runs --------------------------------------------------------------------------------------------------


def test_create_run_queues_it_with_its_plan(client: TestClient) -> None:
    response = client.post("/api/runs", json={**TINY, "batch_size": 10, "learning_rate": 3e-4, "epochs": 2})
    assert response.status_code == 201
    run = response.json()
    assert run["status"] == "queued" and run["id"] >= 1
    assert run["name"] == "adamw lr=0.0003 bs=10"  # generated, as for a run started from the CLI
    assert (run["model"], run["dataset"], run["learning_rate"], run["batch_size"]) == (
        "tiny-random-llama", "synthetic-arithmetic", 3e-4, 10,
    )  # fmt: skip
    assert (run["n_train"], run["updates_per_epoch"], run["total_steps"], run["steps_done"]) == (1000, 100, 200, 0)
    assert run["config"]["epochs"] == 2 and run["config"]["lora_r"] == 8
    assert "pid" not in run
    assert client.get(f"/api/runs/{run['id']}").json() == run

    named = client.post("/api/runs", json={**TINY, "name": "baseline", "max_steps": 7}).json()
    assert named["name"] == "baseline" and named["total_steps"] == 7


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"learning_rate": -1}, "body.learning_rate", "finite number > 0"),
        ({"learning_rate": 0}, "body.learning_rate", "finite number > 0"),
        ({"batch_size": 0}, "body.batch_size", "greater than or equal to 1"),
        ({"epochs": -2}, "body.epochs", "greater than 0"),
        ({"optimizer": "lion"}, "body.optimizer", "adamw"),
        ({"bogus": 1}, "body.bogus", "Extra inputs"),
        ({"model": "no-such-model"}, "body.model", "unknown model 'no-such-model'"),
        ({"dataset": "no-such-data"}, "body.dataset", "unknown dataset 'no-such-data'"),
        ({"dataset": "/etc/passwd"}, "body.dataset", "unknown dataset '/etc/passwd'"),
        ({"dataset": "../stepscope.db"}, "body.dataset", "unknown dataset"),
    ],
)
def test_invalid_config_gets_422_naming_field_and_reason(
    client: TestClient, body: dict[str, object], field: str, reason: str
) -> None:
    response = client.post("/api/runs", json={**TINY, **body})
    assert response.status_code == 422
    assert reason in errors(response)[field]
    assert client.get("/api/runs").json()["count"] == 0


def test_infinite_learning_rate_gets_422(client: TestClient) -> None:
    body = json.dumps({**TINY}).replace("}", ', "learning_rate": Infinity}')
    response = client.post("/api/runs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "finite" in errors(response)["body.learning_rate"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/runs/999"),
        ("POST", "/api/runs/999/cancel"),
        ("DELETE", "/api/runs/999"),
        ("GET", "/api/runs/999/metrics"),
        ("GET", "/api/runs/999/metrics.csv"),
        ("GET", "/api/runs/999/events"),
        ("GET", "/api/compare?ids=999"),
        ("GET", "/api/sweeps/999"),
        ("POST", "/api/sweeps/999/cancel"),
        ("DELETE", "/api/datasets/999"),
    ],
)
def test_unknown_ids_get_404(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 404
    assert "999" in response.json()["detail"]


def test_huge_or_negative_ids_are_rejected_not_crashing(client: TestClient) -> None:
    assert client.get(f"/api/runs/{2**70}").status_code == 422
    assert client.get("/api/runs/-1").status_code == 422
    assert client.get(f"/api/runs?sweep_id={2**64}").status_code == 422


def test_list_runs_filters_sorts_and_paginates(client: TestClient, db: sqlite3.Connection) -> None:
    for lr in (1e-4, 3e-4, 1e-3):
        client.post("/api/runs", json={**TINY, "learning_rate": lr, "name": f"lr {lr:g}"})
    finish(db, 2)
    page = client.get("/api/runs").json()
    assert page["count"] == 3 and [r["id"] for r in page["data"]] == [3, 2, 1]  # newest first
    assert [r["id"] for r in client.get("/api/runs?sort=learning_rate").json()["data"]] == [1, 2, 3]
    assert [r["id"] for r in client.get("/api/runs?sort=-learning_rate&limit=2").json()["data"]] == [3, 2]
    second = client.get("/api/runs?sort=id&limit=2&offset=2").json()
    assert second["count"] == 3 and [r["id"] for r in second["data"]] == [3]
    assert [r["id"] for r in client.get("/api/runs?status=completed").json()["data"]] == [2]
    assert [r["id"] for r in client.get("/api/runs?status=queued&status=completed&sort=id").json()["data"]] == [1, 2, 3]
    assert [r["name"] for r in client.get("/api/runs?name=0.001").json()["data"]] == ["lr 0.001"]
    assert client.get("/api/runs?name=%25").json()["count"] == 0  # '%' is a character, not a wildcard
    assert client.get("/api/runs?sort=pid").status_code == 422
    assert client.get("/api/runs?status=exploded").status_code == 422


def test_cancel_a_queued_run_and_409_once_finished(client: TestClient) -> None:
    run_id = client.post("/api/runs", json=TINY).json()["id"]
    cancelled = client.post(f"/api/runs/{run_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"] is not None
    again = client.post(f"/api/runs/{run_id}/cancel")
    assert again.status_code == 409 and "already finished (cancelled)" in again.json()["detail"]


def test_delete_only_finished_runs_with_their_rows_and_files(
    client: TestClient, db: sqlite3.Connection, settings: Settings
) -> None:
    keep = client.post("/api/runs", json=TINY).json()["id"]
    run_id = client.post("/api/runs", json=TINY).json()["id"]
    add_steps(db, run_id, [2.0, 1.5, 1.2], lrs=2e-4)
    add_steps(db, keep, [3.0], lrs=2e-4)
    db.execute("INSERT INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, 3, 1.1, 0.3)", (run_id,))
    folder = settings.runs_dir / str(run_id)
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"x")

    refused = client.delete(f"/api/runs/{run_id}")
    assert refused.status_code == 409 and "queued" in refused.json()["detail"]
    finish(db, run_id)
    assert client.delete(f"/api/runs/{run_id}").status_code == 204
    assert client.get(f"/api/runs/{run_id}").status_code == 404
    assert db.execute("SELECT count(*) FROM step_metrics WHERE run_id = ?", (run_id,)).fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM eval_metrics WHERE run_id = ?", (run_id,)).fetchone() == (0,)
    assert not folder.exists()
    assert db.execute("SELECT count(*) FROM step_metrics WHERE run_id = ?", (keep,)).fetchone() == (1,)


# --- sweeps ------------------------------------------------------------------------------------------------


def test_a_sweep_of_three_rates_creates_three_queued_runs(client: TestClient) -> None:
    body = {"name": "lr hunt", "config": {**TINY, "max_steps": 30}, "learning_rates": [1e-4, 1e-3, 1e-2]}
    response = client.post("/api/sweeps", json=body)
    assert response.status_code == 201
    sweep = response.json()
    assert sweep["name"] == "lr hunt" and sweep["learning_rates"] == [1e-4, 1e-3, 1e-2]
    runs = sweep["runs"]
    assert [r["learning_rate"] for r in runs] == [1e-4, 1e-3, 1e-2]
    assert [r["name"] for r in runs] == ["lr hunt lr=0.0001", "lr hunt lr=0.001", "lr hunt lr=0.01"]
    assert {r["status"] for r in runs} == {"queued"} and {r["sweep_id"] for r in runs} == {sweep["id"]}
    assert {r["total_steps"] for r in runs} == {30}
    listed = client.get(f"/api/runs?sweep_id={sweep['id']}&sort=id").json()
    assert [r["id"] for r in listed["data"]] == [r["id"] for r in runs]
    assert client.get(f"/api/sweeps/{sweep['id']}").json()["runs"] == runs
    assert client.get("/api/sweeps").json()["count"] == 1

    cancelled = client.post(f"/api/sweeps/{sweep['id']}/cancel").json()
    assert {r["status"] for r in cancelled["runs"]} == {"cancelled"}


def test_a_sweep_over_a_log_range(client: TestClient) -> None:
    body = {"config": TINY, "learning_rates": {"min": 1e-5, "max": 1e-1, "count": 5}}
    sweep = client.post("/api/sweeps", json=body).json()
    assert sweep["learning_rates"] == [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert [r["name"] for r in sweep["runs"]][:2] == [f"sweep {sweep['id']} lr=1e-05", f"sweep {sweep['id']} lr=0.0001"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": TINY, "learning_rates": [1e-3, -1.0]}, "body.learning_rates.list.1"),
        ({"config": TINY, "learning_rates": []}, "body.learning_rates.list"),
        ({"config": TINY, "learning_rates": {"min": 1e-2, "max": 1e-4, "count": 3}}, "body.learning_rates.range"),
        ({"config": {**TINY, "model": "nope"}, "learning_rates": [1e-3]}, "body.config.model"),
        ({"config": {**TINY, "dataset": "nope"}, "learning_rates": [1e-3]}, "body.config.dataset"),
        ({"config": {**TINY, "kind": "lr_range_test"}, "learning_rates": [1e-3]}, "body.config.kind"),
    ],
)
def test_invalid_sweeps_get_422_and_create_nothing(client: TestClient, body: dict[str, object], field: str) -> None:
    response = client.post("/api/sweeps", json=body)
    assert response.status_code == 422
    assert any(loc.startswith(field) for loc in errors(response)), errors(response)
    assert client.get("/api/sweeps").json()["count"] == 0 and client.get("/api/runs").json()["count"] == 0


# --- datasets and models -----------------------------------------------------------------------------------


def test_upload_a_dataset_and_train_on_it(client: TestClient, settings: Settings) -> None:
    rows = b"".join(b'{"prompt": "Q%d", "completion": "A"}\n' % i for i in range(20))
    response = client.post("/api/datasets", files={"file": ("../../escape.jsonl", rows)}, data={"name": "mine"})
    assert response.status_code == 201
    dataset = response.json()
    assert (dataset["name"], dataset["format"], dataset["n_rows"], dataset["size_bytes"]) == (
        "mine", "prompt_completion", 20, len(rows),
    )  # fmt: skip
    stored = settings.datasets_dir / dataset["filename"]
    assert stored.parent == settings.datasets_dir and stored.read_bytes() == rows
    assert "escape" not in dataset["filename"] and not (settings.home.parent / "escape.jsonl").exists()
    listing = client.get("/api/datasets").json()
    assert [d["filename"] for d in listing["uploaded"]] == [dataset["filename"]]
    assert "synthetic-arithmetic" in [d["name"] for d in listing["builtin"]]

    run = client.post("/api/runs", json={**TINY, "dataset": dataset["filename"], "batch_size": 6}).json()
    assert (run["n_train"], run["updates_per_epoch"]) == (18, 3)  # 10% held out for eval
    assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 409  # a queued run needs it
    client.post(f"/api/runs/{run['id']}/cancel")
    assert client.delete(f"/api/datasets/{dataset['id']}").status_code == 204
    assert not stored.exists()


def test_an_invalid_upload_names_line_and_field_and_is_not_kept(client: TestClient, settings: Settings) -> None:
    rows = b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n'
    response = client.post("/api/datasets", files={"file": ("bad.jsonl", rows)})
    assert response.status_code == 422
    detail = response.json()["detail"][0]
    assert detail["loc"] == ["body", "file"] and detail["line"] == 2 and detail["field"] == "completion"
    assert "bad.jsonl, line 2, field 'completion'" in detail["msg"]
    assert list(settings.datasets_dir.iterdir()) == []

    wrong_type = client.post("/api/datasets", files={"file": ("data.exe", b"MZ")})
    assert wrong_type.status_code == 422 and ".jsonl" in wrong_type.json()["detail"][0]["msg"]
    assert client.get("/api/datasets").json()["uploaded"] == []


def test_uploads_over_the_limit_get_413(home: Path) -> None:
    settings = Settings(max_upload_bytes=1000)
    with TestClient(create_app(settings, run_jobs=False)) as client:
        big = b'{"text": "%s"}\n' % (b"x" * 2000)
        response = client.post("/api/datasets", files={"file": ("big.jsonl", big)})
        assert response.status_code == 413
        huge = client.post("/api/datasets", files={"file": ("huge.jsonl", b"x" * 200_000)})
        assert huge.status_code == 413  # refused by the body limit before it is parsed
        assert list(settings.datasets_dir.glob("*")) == []


def test_models_and_health(client: TestClient) -> None:
    models = client.get("/api/models").json()
    assert {"tiny-random-llama", "smollm2-135m-instruct"} <= {m["name"] for m in models}
    assert all(m["description"] for m in models)
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["runner"]["active"] is False and health["runs"] == {}


# --- metrics -----------------------------------------------------------------------------------------------


def test_metrics_json_csv_compare_and_events(client: TestClient, db: sqlite3.Connection) -> None:
    a = client.post("/api/runs", json={**TINY, "name": "a", "learning_rate": 1e-3}).json()["id"]
    b = client.post("/api/runs", json={**TINY, "name": "b", "learning_rate": 1e-2}).json()["id"]
    add_steps(db, a, [3.0, 2.0, 1.0, 0.5], lrs=2e-4)
    add_steps(db, b, [3.0, 9.0], lrs=2e-4)
    db.execute("INSERT INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, 2, 2.2, 0.2)", (a,))

    body = client.get(f"/api/runs/{a}/metrics?keys=loss,lr,eval_loss").json()
    assert body == {
        "run_id": a,
        "steps": [1, 2, 3, 4],
        "series": {"loss": [3.0, 2.0, 1.0, 0.5], "lr": [2e-4] * 4, "eval_loss": [None, 2.2, None, None]},
        "downsampled": False,
    }
    assert client.get(f"/api/runs/{a}/metrics").json()["series"] == {"loss": [3.0, 2.0, 1.0, 0.5]}
    assert client.get(f"/api/runs/{a}/metrics?since_step=2").json()["steps"] == [3, 4]
    enough = client.get(f"/api/runs/{a}/metrics?keys=loss&max_points=4").json()
    assert enough["downsampled"] is False and enough["steps"] == [1, 2, 3, 4]
    spiky = client.post("/api/runs", json=TINY).json()["id"]
    add_steps(db, spiky, [1.0] * 500 + [40.0] + [1.0] * 499, lrs=2e-4)
    small = client.get(f"/api/runs/{spiky}/metrics?keys=loss&max_points=50").json()
    assert small["downsampled"] is True and len(small["steps"]) <= 50 and 501 in small["steps"]
    assert max(small["series"]["loss"]) == 40.0
    bad = client.get(f"/api/runs/{a}/metrics?keys=loss,nope")
    assert bad.status_code == 422 and "nope" in errors(bad)["query.keys"]

    response = client.get(f"/api/runs/{a}/metrics.csv")
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[1]["loss"] == "2.0" and rows[1]["eval_loss"] == "2.2" and rows[0]["tokens"] == "100"

    compared = client.get(f"/api/compare?ids={b},{a}&keys=loss").json()
    assert [(r["name"], r["learning_rate"], r["status"]) for r in compared["runs"]] == [
        ("b", 1e-2, "queued"), ("a", 1e-3, "queued"),
    ]  # fmt: skip
    assert compared["runs"][0]["series"]["loss"] == [3.0, 9.0]
    assert client.get("/api/compare?ids=1,x").status_code == 422
    missing = client.get(f"/api/compare?ids={a},777")
    assert missing.status_code == 404 and "777" in missing.json()["detail"]

    finish(db, a)
    stream = client.get(f"/api/runs/{a}/events")  # a finished run: everything, then the stream ends
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [block for block in stream.text.split("\n\n") if block.strip()]
    assert events[0].startswith("event: steps\nid: 4\ndata: ")
    steps = json.loads(events[0].split("data: ", 1)[1])
    assert steps["steps"] == [1, 2, 3, 4] and steps["series"]["loss"] == [3.0, 2.0, 1.0, 0.5]
    assert set(steps["series"]) == set(STEP_COLUMNS)
    assert json.loads(events[1].split("data: ", 1)[1]) == {"steps": [2], "series": {"eval_loss": [2.2]}}
    status = json.loads(events[-1].split("data: ", 1)[1])
    assert events[-1].startswith("event: status") and status["status"] == "completed" and status["id"] == a
    resumed = client.get(f"/api/runs/{a}/events", headers={"Last-Event-ID": "3"}).text
    assert json.loads(resumed.split("data: ", 1)[1].split("\n", 1)[0])["steps"] == [4]


# --- security ----------------------------------------------------------------------------------------------


def test_with_a_token_state_changes_need_it(home: Path) -> None:
    settings = Settings(token="s3cret")
    with TestClient(create_app(settings, run_jobs=False)) as client:
        refused = client.post("/api/runs", json=TINY)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/api/runs", json=TINY, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = client.post("/api/runs", json=TINY, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201
        assert client.get("/api/runs").json()["count"] == 1  # reads stay open on a loopback address
        assert client.post("/api/runs/1/cancel").status_code == 401
        assert client.delete("/api/datasets/1").status_code == 401


def test_on_a_public_address_reads_need_the_token_too(home: Path) -> None:
    settings = Settings(host="0.0.0.0", token="s3cret")
    with TestClient(create_app(settings, run_jobs=False)) as client:
        assert client.get("/api/runs").status_code == 401
        assert client.get("/api/runs/1/metrics").status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/api/health").status_code == 200


def test_a_public_address_without_token_is_refused(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--port", "8765"]) == 2
    assert "STEPSCOPE_TOKEN" in capsys.readouterr().err


def test_stepscope_train_hands_its_arguments_to_the_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    assert "--learning-rate" in capsys.readouterr().out


# --- the app -----------------------------------------------------------------------------------------------


def test_openapi_documents_the_api_and_plotly_is_served_locally(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in (
        "/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/cancel", "/api/runs/{run_id}/metrics",
        "/api/runs/{run_id}/metrics.csv", "/api/runs/{run_id}/events", "/api/compare", "/api/sweeps",
        "/api/sweeps/{sweep_id}", "/api/models", "/api/datasets", "/api/health",
    ):  # fmt: skip
        assert path in schema["paths"], path
    create = schema["paths"]["/api/runs"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/TrainConfig")
    plotly = client.get("/static/vendor/plotly.min.js")
    assert plotly.status_code == 200 and "plotly" in plotly.text[:2000].lower()


def test_public_server_lets_a_signed_in_browser_read_but_not_write(home, monkeypatch) -> None:
    """On a public address the dashboard's scripts read the API with the sign-in cookie; writes need the token."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app
    from app.security import AUTH_COOKIE, auth_cookie_value

    settings = Settings(host="0.0.0.0", token="s3cret")
    with TestClient(create_app(settings, run_jobs=False)) as client:
        assert client.get("/api/runs").status_code == 401
        client.cookies.set(AUTH_COOKIE, auth_cookie_value("s3cret"))
        assert client.get("/api/runs").status_code == 200
        assert client.post("/api/runs", json={"model": "tiny-random-llama"}).status_code == 401
        client.cookies.set(AUTH_COOKIE, auth_cookie_value("wrong"))
        assert client.get("/api/runs").status_code == 401


def test_smoothing_runs_over_every_step_before_downsampling(client: TestClient, db: sqlite3.Connection) -> None:
    run_id = client.post("/api/runs", json=TINY).json()["id"]
    rng = random.Random(7)
    losses = [2 + math.sin(t / 9) + rng.gauss(0, 0.3) for t in range(1, 1201)]
    add_steps(db, run_id, losses, lrs=2e-4)
    body = client.get(f"/api/runs/{run_id}/metrics", params={"keys": "loss", "max_points": 60, "smoothing": 0.8}).json()
    full = ema_smooth(losses, 0.8)
    assert body["downsampled"] and len(body["steps"]) < 200
    assert body["smoothed"]["loss"] == pytest.approx([full[s - 1] for s in body["steps"]], rel=1e-12)
    # ... which is not what smoothing the answered points themselves gives.
    assert body["smoothed"]["loss"] != pytest.approx(ema_smooth(body["series"]["loss"], 0.8), rel=1e-3)
    # The state continues the smoothing on rows that arrive later, as the dashboard does with live rows.
    last, count = body["smoothing_state"]["loss"]
    more = [1.5, 1.7, None, 1.2]
    continued = []
    for v in more:
        if v is not None:
            last, count = last * 0.8 + 0.2 * v, count + 1
            continued.append(last / (1 - 0.8**count))
    expected = [v for v in ema_smooth([*losses, *more], 0.8)[len(losses):] if v == v]
    assert continued == pytest.approx(expected, rel=1e-12)
    compared = client.get("/api/compare", params={"ids": str(run_id), "max_points": 60, "smoothing": 0.8}).json()
    assert compared["runs"][0]["smoothed"] == body["smoothed"]
    bad = client.get(f"/api/runs/{run_id}/metrics", params={"smoothing": 1.0})
    assert bad.status_code == 422 and errors(bad) == {"query.smoothing": "Input should be less than 1"}


def test_only_an_interrupted_run_can_be_resumed(client: TestClient, db: sqlite3.Connection) -> None:
    run_id = client.post("/api/runs", json=TINY).json()["id"]
    assert client.post(f"/api/runs/{run_id}/resume").status_code == 409  # queued
    db.execute(
        "UPDATE runs SET status = 'interrupted', pid = 4242, error = 'its process was gone', "
        "finished_at = '2026-01-01 00:00:00.000000' WHERE id = ?",
        (run_id,),
    )
    resumed = client.post(f"/api/runs/{run_id}/resume")
    assert resumed.status_code == 200
    body = resumed.json()
    assert (body["status"], body["error"], body["finished_at"]) == ("queued", None, None)
    assert db.execute("SELECT pid FROM runs WHERE id = ?", (run_id,)).fetchone() == (None,)  # the runner may take it
    assert client.post(f"/api/runs/{run_id}/resume").status_code == 409
    assert client.post("/api/runs/999/resume").status_code == 404
