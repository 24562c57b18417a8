"""Learning-rate insight through the API and the pages: run and sweep summaries, the runs CSV, LR range tests
and the sweep around a range test's suggestion, ending with a real range test of the tiny model."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest
from bs4 import BeautifulSoup
from fastapi.testclient import TestClient

from analysis.range_test import lr_range_suggestions
from analysis.runs import summarize_run
from app.config import Settings
from app.main import create_app
from app.pages.render import fmt_lr
from tests.conftest import add_steps

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic"}
RANGE_TEST = {"suggested_lr": 3e-4, "valley_lr": 3e-4, "steepest_lr": 1e-3, "min_loss_lr": 1e-2, "stop_index": 80}
RANGE_TEST |= {"sweep_lrs": [3e-5, 9.49e-5, 3e-4, 9.49e-4, 3e-3], "smoothing_weight": 0.9, "skip_start": 8}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_jobs=False), follow_redirects=False) as client:
        yield client


def set_run(db: sqlite3.Connection, run_id: int, status: str, summary: dict[str, Any] | None = None) -> None:
    """A run's end as the trainer records it: status, and the analysis with its verdict."""
    verdict = summary.get("verdict") if summary else None
    db.execute(
        "UPDATE runs SET status = ?, summary = ?, verdict = ? WHERE id = ?",
        (status, json.dumps(summary) if summary else None, verdict, run_id),
    )


def decaying(n: int, start: float = 3.0, end: float = 1.0) -> list[float]:
    return [end + (start - end) * math.exp(-i / (n / 5)) + 0.02 * (-1) ** i for i in range(n)]


def errors(response: Any) -> dict[str, str]:
    return {".".join(str(p) for p in d["loc"]): d["msg"] for d in response.json()["detail"]}


# --- GET /api/runs/{id}/summary -----------------------------------------------------------------------------


def test_a_finished_run_answers_its_stored_summary(client: TestClient, db: sqlite3.Connection) -> None:
    run_id = client.post("/api/runs", json=TINY).json()["id"]
    stored = {"final_loss": 0.123, "t90": 40, "verdict": "too_low", "reason": "It crawled.", "spike_count": 0}
    set_run(db, run_id, "completed", stored)
    add_steps(db, run_id, decaying(50))  # the rows say otherwise: the stored analysis is what counts

    body = client.get(f"/api/runs/{run_id}/summary").json()
    assert body == {**stored, "run_id": run_id, "status": "completed", "live": False, "n_steps": None,
                    "best_loss": None, "auc_norm": None, "sign_change_rate": None, "tv_ratio": None,
                    "median_update_ratio": None, "median_step_scale": None, "range_test": None,
                    "next_lrs": [], "verdict_basis": "run", "solo_verdict": None, "solo_reason": None,
                    "grad_alignment_mean": None, "grad_alignment_t": None, "update_cos_mean": None,
                    "final_eval_loss": None}  # fmt: skip
    listed = client.get("/api/runs").json()["data"][0]
    assert listed["verdict"] == "too_low" and listed["summary"] == stored  # the scores in GET /api/runs


def test_a_running_run_is_summarised_live_from_its_rows(client: TestClient, db: sqlite3.Connection) -> None:
    run_id = client.post("/api/runs", json=TINY).json()["id"]
    set_run(db, run_id, "running")
    losses = decaying(60)
    add_steps(db, run_id, losses)

    body = client.get(f"/api/runs/{run_id}/summary").json()
    steps = list(range(1, 61))
    expected = summarize_run(steps, {"loss": losses, "lr": [1e-3] * 60, "grad_norm": [2.0] * 60,
                                     "update_ratio": [1e-3] * 60, "step_scale": [1.0] * 60,
                                     "update_cos": [0.5] * 60, "grad_alignment": [-0.1] * 60})  # fmt: skip
    assert body["live"] is True and body["status"] == "running" and body["run_id"] == run_id
    assert body["n_steps"] == 60 and body["final_loss"] == pytest.approx(expected["final_loss"])
    assert body["verdict"] == expected["verdict"] and body["reason"] == expected["reason"]
    assert body["median_update_ratio"] == 1e-3 and body["median_step_scale"] == 1.0
    assert "range_test" not in body or body["range_test"] is None

    add_steps(db, run_id, [0.9], first=61, rollups=False)
    assert client.get(f"/api/runs/{run_id}/summary").json()["n_steps"] == 61  # recomputed at each request


def test_a_killed_run_without_stored_summary_is_summarised_with_its_status(
    client: TestClient, db: sqlite3.Connection
) -> None:
    run_id = client.post("/api/runs", json=TINY).json()["id"]
    set_run(db, run_id, "diverged")  # as when the job runner records a job that died without writing one
    add_steps(db, run_id, decaying(30))
    body = client.get(f"/api/runs/{run_id}/summary").json()
    assert body["live"] is False and body["verdict"] == "diverged"


def test_a_range_test_in_progress_gets_live_suggestions(client: TestClient, db: sqlite3.Connection) -> None:
    run_id = client.post("/api/lr-range-tests", json={"config": TINY, "min_lr": 1e-6, "max_lr": 1.0}).json()["id"]
    set_run(db, run_id, "running")
    lrs = [1e-6 * 10 ** (6 * i / 99) for i in range(70)]
    losses = [3.0 - 2.0 / (1 + math.exp(-(math.log10(lr) + 3.5) * 3)) for lr in lrs]  # falls around 3e-4
    add_steps(db, run_id, losses, lrs)
    body = client.get(f"/api/runs/{run_id}/summary").json()
    expected = lr_range_suggestions(lrs, losses)
    assert body["live"] is True
    assert body["range_test"]["suggested_lr"] == pytest.approx(expected["suggested_lr"])
    assert body["range_test"]["steepest_lr"] == pytest.approx(expected["steepest_lr"])
    assert 1e-5 < body["range_test"]["suggested_lr"] < 1e-2 and len(body["range_test"]["sweep_lrs"]) == 5


def test_summary_of_an_unknown_run_is_404(client: TestClient) -> None:
    response = client.get("/api/runs/999/summary")
    assert response.status_code == 404 and "999" in response.json()["detail"]


# --- GET /api/sweeps/{id}/summary ---------------------------------------------------------------------------


def test_sweep_summary_ranks_stored_and_live_runs(client: TestClient, db: sqlite3.Connection) -> None:
    body = {"name": "s", "config": {**TINY, "max_steps": 60}, "learning_rates": [1e-4, 1e-3, 1e-2, 1e-1]}
    low, mid, high, going = (r["id"] for r in client.post("/api/sweeps", json=body).json()["runs"])
    set_run(db, low, "completed", {"final_loss": 1.5, "verdict": "too_low", "reason": "slow"})
    set_run(db, mid, "completed", {"final_loss": 1.0, "verdict": "ok", "reason": "fine"})
    set_run(db, high, "completed", {"final_loss": 0.9, "verdict": "too_high", "reason": "bouncy"})
    set_run(db, going, "running")
    add_steps(db, going, decaying(40, end=0.5))  # lowest loss, but still going: not compared yet

    # The completed runs are judged against each other: the lowest loss (1e-2's) is the best, whatever its
    # own steps said, and the others are too low beside it.
    summary = client.get("/api/sweeps/1/summary").json()
    assert summary["sweep_id"] == 1 and summary["live"] is True
    assert summary["recommended_run_id"] == high and summary["recommended_lr"] == 1e-2
    assert summary["ok_range"] == [1e-2, 1e-2] and summary["edge"] == "high" and summary["next_lrs"] == [0.0316, 0.1]
    assert [e["id"] for e in summary["ranking"]] == [high, mid, low, going]
    assert [e["rank"] for e in summary["ranking"]] == [1, 2, 3, 4]
    assert [e["verdict"] for e in summary["ranking"][:3]] == ["ok", "too_low", "too_low"]
    assert summary["ranking"][0]["solo_verdict"] == "too_high"
    assert summary["ranking"][3]["status"] == "running" and summary["ranking"][3]["final_loss"] < 0.6
    assert summary["sentence"].startswith("Recommended learning rate 0.01 (run 3)")

    set_run(db, going, "cancelled", {"final_loss": 0.5, "verdict": "ok"})
    assert client.get("/api/sweeps/1/summary").json()["live"] is False
    assert client.get("/api/sweeps/999/summary").status_code == 404


# --- GET /api/runs.csv --------------------------------------------------------------------------------------


def test_runs_csv_has_one_row_per_run_with_its_scores(client: TestClient, db: sqlite3.Connection) -> None:
    done = client.post("/api/runs", json={**TINY, "name": "done, with a comma", "learning_rate": 1e-3}).json()["id"]
    going = client.post("/api/runs", json={**TINY, "name": "going", "batch_size": 4}).json()["id"]
    queued = client.post("/api/runs", json={**TINY, "name": "queued", "optimizer": "sgd"}).json()["id"]
    stored = {"final_loss": 0.5, "best_loss": 0.45, "t90": 30, "auc_norm": 0.2, "sign_change_rate": 0.6,
              "tv_ratio": 1.5, "spike_count": 1, "median_update_ratio": 1e-3, "median_step_scale": 1.0,
              "verdict": "ok", "reason": "The step size looks right."}  # fmt: skip
    set_run(db, done, "completed", stored)
    db.execute("UPDATE runs SET steps_done = 50 WHERE id = ?", (done,))
    set_run(db, going, "running")
    add_steps(db, going, decaying(25))

    response = client.get("/api/runs.csv?sort=id")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert 'filename="runs.csv"' in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == [
        "id", "name", "kind", "status", "model", "dataset", "learning_rate", "batch_size", "optimizer", "steps_done",
        "final_loss", "best_loss", "final_eval_loss", "t90", "auc_norm", "sign_change_rate", "tv_ratio",
        "spike_count", "median_update_ratio", "median_step_scale", "grad_alignment_mean", "update_cos_mean",
        "verdict", "reason", "next_lrs",
    ]  # fmt: skip
    assert [r["id"] for r in rows] == [str(done), str(going), str(queued)]
    first = rows[0]
    assert (first["name"], first["kind"], first["status"], first["learning_rate"]) == (
        "done, with a comma", "train", "completed", "0.001",
    )  # fmt: skip
    assert (first["model"], first["dataset"], first["batch_size"], first["optimizer"], first["steps_done"]) == (
        "tiny-random-llama", "synthetic-arithmetic", "8", "adamw", "50",
    )  # fmt: skip
    assert {k: first[k] for k in stored} == {k: str(v) for k, v in stored.items()}
    live = client.get(f"/api/runs/{going}/summary").json()  # computed now from its 25 rows
    assert float(rows[1]["final_loss"]) == pytest.approx(live["final_loss"]) and rows[1]["reason"] == live["reason"]
    assert rows[2]["status"] == "queued" and rows[2]["final_loss"] == rows[2]["verdict"] == ""

    only_done = list(csv.DictReader(io.StringIO(client.get("/api/runs.csv?status=completed").text)))
    assert [r["id"] for r in only_done] == [str(done)]
    assert client.get("/api/runs.csv?sort=nope").status_code == 422


# --- POST /api/lr-range-tests -------------------------------------------------------------------------------


def test_a_range_test_is_queued_with_its_rates_and_steps(client: TestClient) -> None:
    body = {"config": {**TINY, "optimizer": "sgd", "batch_size": 4}, "min_lr": 1e-5, "max_lr": 10, "num_steps": 60}
    response = client.post("/api/lr-range-tests", json=body)
    assert response.status_code == 201
    run = response.json()
    assert (run["kind"], run["status"], run["total_steps"], run["batch_size"]) == ("lr_range_test", "queued", 60, 4)
    assert (run["config"]["range_min_lr"], run["config"]["range_max_lr"], run["config"]["max_steps"]) == (1e-5, 10, 60)
    assert run["name"] == "lr range 1e-05 to 10, sgd bs=4"

    defaults = client.post("/api/lr-range-tests", json={"config": {**TINY, "name": "mine"}}).json()
    assert defaults["name"] == "mine" and defaults["total_steps"] == 100
    assert (defaults["config"]["range_min_lr"], defaults["config"]["range_max_lr"]) == (1e-7, 1.0)


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"min_lr": 1e-2, "max_lr": 1e-3}, "body.max_lr", "must be above min_lr"),
        ({"min_lr": 1e-3, "max_lr": 1e-3}, "body.max_lr", "must be above min_lr"),
        ({"min_lr": 0}, "body.min_lr", "greater than 0"),
        ({"max_lr": -1}, "body.max_lr", "greater than 0"),
        ({"num_steps": 1}, "body.num_steps", "greater than or equal to 2"),
        ({"num_steps": 10**9}, "body.num_steps", "less than or equal to"),
        ({"steps": 10}, "body.steps", "Extra inputs"),
        ({"config": {**TINY, "model": "no-such-model"}}, "body.config.model", "unknown model"),
        ({"config": {**TINY, "batch_size": 0}}, "body.config.batch_size", "greater than or equal to 1"),
    ],
)
def test_invalid_range_tests_get_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str, reason: str
) -> None:
    response = client.post("/api/lr-range-tests", json={"config": TINY, **body})
    assert response.status_code == 422
    assert reason in errors(response).get(field, ""), errors(response)
    assert client.get("/api/runs").json()["count"] == 0


def test_an_infinite_max_lr_gets_422(client: TestClient) -> None:
    body = json.dumps({"config": TINY}).replace("}}", '}, "max_lr": Infinity}')
    response = client.post("/api/lr-range-tests", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and "finite" in errors(response)["body.max_lr"]


# --- POST /api/lr-range-tests/{id}/sweep --------------------------------------------------------------------


def test_a_sweep_around_a_completed_range_test(client: TestClient, db: sqlite3.Connection) -> None:
    body = {"config": {**TINY, "optimizer": "sgd", "batch_size": 4}, "num_steps": 40}
    run_id = client.post("/api/lr-range-tests", json=body).json()["id"]
    too_early = client.post(f"/api/lr-range-tests/{run_id}/sweep")
    assert too_early.status_code == 409 and "has not completed" in too_early.json()["detail"]
    set_run(db, run_id, "completed", {"verdict": None, "range_test": RANGE_TEST})

    response = client.post(f"/api/lr-range-tests/{run_id}/sweep")
    assert response.status_code == 201
    sweep = response.json()
    assert sweep["name"] == f"from range test {run_id}" and sweep["learning_rates"] == RANGE_TEST["sweep_lrs"]
    runs = sweep["runs"]
    assert [r["learning_rate"] for r in runs] == RANGE_TEST["sweep_lrs"]
    assert {(r["kind"], r["status"], r["optimizer"], r["batch_size"], r["total_steps"]) for r in runs} == {
        ("train", "queued", "sgd", 4, 40)
    }
    assert runs[0]["name"] == f"from range test {run_id} lr=3e-05"

    train_id = client.post("/api/runs", json=TINY).json()["id"]
    not_a_test = client.post(f"/api/lr-range-tests/{train_id}/sweep")
    assert not_a_test.status_code == 409 and "not an lr range test" in not_a_test.json()["detail"]
    flat = client.post("/api/lr-range-tests", json=body).json()["id"]
    set_run(db, flat, "completed", {"range_test": {**RANGE_TEST, "suggested_lr": None, "sweep_lrs": []}})
    assert client.post(f"/api/lr-range-tests/{flat}/sweep").status_code == 409
    assert client.post("/api/lr-range-tests/999/sweep").status_code == 404


def test_openapi_documents_the_insight_operations(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/runs/{run_id}/summary", "/api/sweeps/{sweep_id}/summary", "/api/runs.csv",
                 "/api/lr-range-tests", "/api/lr-range-tests/{run_id}/sweep"):  # fmt: skip
        assert path in paths, path
    create = paths["/api/lr-range-tests"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/RangeTestCreate")
    assert "text/csv" in paths["/api/runs.csv"]["get"]["responses"]["200"]["content"]
    summary = paths["/api/runs/{run_id}/summary"]["get"]["responses"]["200"]["content"]["application/json"]
    assert summary["schema"]["$ref"].endswith("/RunSummary")


# --- a real range test, end to end --------------------------------------------------------------------------


def test_a_real_range_test_suggests_a_rate_and_its_page_starts_the_sweep(settings: Settings) -> None:
    """The tiny model with plain SGD, through the API and the job runner, then the page's sweep button."""
    config = {"model": "tiny-random-llama", "dataset": "synthetic-lookup", "optimizer": "sgd", "max_grad_norm": 0}
    body = {"config": {**config, "eval_every": 0}, "min_lr": 1e-4, "max_lr": 1e3, "num_steps": 60}
    with TestClient(create_app(settings)) as client:
        run_id = client.post("/api/lr-range-tests", json=body).json()["id"]
        deadline = time.monotonic() + 90
        while (run := client.get(f"/api/runs/{run_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, "the range test did not finish in 90 s"
            time.sleep(0.2)
    assert run["status"] == "completed", run["error"]
    suggestions = run["summary"]["range_test"]
    assert 1e-4 < suggestions["suggested_lr"] < 1e3
    assert suggestions["steepest_lr"] is not None and len(suggestions["sweep_lrs"]) == 5

    # The runner is off from here: the sweep's runs stay queued.
    with TestClient(create_app(settings, run_jobs=False), follow_redirects=False) as client:
        assert client.get(f"/api/runs/{run_id}/summary").json()["range_test"] == suggestions
        soup = BeautifulSoup(client.get(f"/runs/{run_id}").text, "html.parser")
        assert soup.find(id="chart-range") is not None
        page_data = json.loads(soup.find("script", id="page-data").get_text())
        assert page_data["range_test"] == suggestions
        form = soup.find("form", id="range-sweep-form")
        assert form is not None and not form.has_attr("hidden")
        button = form.find("button").get_text(" ", strip=True)
        assert button == f"Start a sweep of 5 rates around {fmt_lr(suggestions['suggested_lr'])}"
        token = form.find("input", attrs={"name": "csrf_token"})["value"]
        response = client.post(form["action"], data={"csrf_token": token})
        assert response.status_code == 303 and response.headers["location"].startswith("/sweeps/")
        sweep_id = int(response.headers["location"].rsplit("/", 1)[1])
        runs = client.get(f"/api/runs?sweep_id={sweep_id}&sort=learning_rate").json()["data"]
    assert [r["learning_rate"] for r in runs] == suggestions["sweep_lrs"]
    assert {(r["status"], r["kind"], r["optimizer"], r["total_steps"]) for r in runs} == {
        ("queued", "train", "sgd", 60)
    }
