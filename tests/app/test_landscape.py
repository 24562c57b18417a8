"""Issue 13 through the API: a sweep's loss map made by a real background process, and a run's probes and
module norms as JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from analysis.landscape import read_stride
from app.config import Settings
from app.main import create_app
from tests.conftest import until_done
from tests.trainer.conftest import train

RATES = ("0.0003", "0.003", "0.03")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Three tiny-model runs of one seed at three rates, trained once for the module's tests."""
    home = tmp_path_factory.mktemp("landscape")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPSCOPE_HOME", str(home))
        mp.delenv("STEPSCOPE_DATABASE_URL", raising=False)
        for lr in RATES:
            flags = ["--learning-rate", lr, "--max-steps", "16", "--probe-every", "4", "--map-snapshots", "8"]
            assert train(*flags, "--module-norms-every", "4") == 0
        yield home


@pytest.fixture
def client(sweep: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("STEPSCOPE_HOME", str(sweep))
    monkeypatch.setenv("STEPSCOPE_ALLOWED_HOSTS", "testserver")  # Starlette's TestClient's host (tests/conftest.py)
    app = create_app(Settings(), run_jobs=False)
    yield TestClient(app)


def test_a_sweeps_map_has_one_path_per_run_from_the_shared_start(client: TestClient, sweep: Path) -> None:
    asked = client.post("/api/maps", json={"run_ids": [1, 2, 3], "resolution": 7})
    assert asked.status_code == 202, asked.text
    done = until_done(client, f"/api/maps/{asked.json()['id']}")
    assert done["status"] == "completed", done["error"]
    result = done["result"]
    assert [p["run_id"] for p in result["paths"]] == [1, 2, 3]
    assert [p["learning_rate"] for p in result["paths"]] == [float(r) for r in RATES]
    for path in result["paths"]:
        assert path["steps"] == [0, 2, 4, 6, 8, 10, 12, 14, 16]
        assert (path["x"][0], path["y"][0]) == (0.0, 0.0)  # one seed, one LoRA initialisation: one start
    # a larger rate walks further from the start
    reach = [max(abs(x) + abs(y) for x, y in zip(p["x"], p["y"], strict=True)) for p in result["paths"]]
    assert reach == sorted(reach) and reach[0] < reach[2]
    assert len(result["xs"]) == len(result["ys"]) == 7 and len(result["losses"]) == 7
    assert all(len(row) == 7 for row in result["losses"])
    # every path lies on the grid
    for path in result["paths"]:
        assert max(map(abs, path["x"])) <= result["xs"][-1] and max(map(abs, path["y"])) <= result["ys"][-1]
    assert 0 < result["explained"] <= 1
    # the centre of the grid is the start: its value is the probe loss before the first step (α = 0 at step 1)
    first = client.get("/api/runs/1/probes").json()
    start_loss = first["probes"][0]["losses"][first["alphas"].index(0.0)]
    assert result["centre_loss"] == pytest.approx(start_loss, rel=1e-5)
    assert result["losses"][3][3] == result["centre_loss"]
    # asked again: the stored map, not a second job
    again = client.post("/api/maps", json={"run_ids": [3, 2, 1], "resolution": 7})
    assert again.status_code == 200 and again.json()["id"] == done["id"]
    # and the compare page of those runs shows it (whatever its resolution), with no button to make it again
    page = client.get("/compare?ids=1,2,3").text
    assert f'data-map-id="{done["id"]}"' in page and "7×7 grid" in page


def test_map_requests_are_checked(client: TestClient, sweep: Path) -> None:
    even = client.post("/api/maps", json={"run_ids": [1], "resolution": 8})
    assert even.status_code == 422 and even.json()["detail"][0]["loc"] == ["body", "resolution"]
    assert "odd" in even.json()["detail"][0]["msg"]
    twice = client.post("/api/maps", json={"run_ids": [1, 1]})
    assert twice.status_code == 422 and twice.json()["detail"][0]["loc"] == ["body", "run_ids"]
    assert client.post("/api/maps", json={"run_ids": []}).status_code == 422
    assert client.post("/api/maps", json={"run_ids": [99]}).status_code == 404
    assert client.get("/api/maps/12345").status_code == 404
    (sweep / "runs" / "2" / "snapshots.pt").rename(sweep / "runs" / "2" / "kept.pt")
    try:
        missing = client.post("/api/maps", json={"run_ids": [1, 2]})
        assert missing.status_code == 409 and "run 2 kept no weight snapshots" in missing.text
    finally:
        (sweep / "runs" / "2" / "kept.pt").rename(sweep / "runs" / "2" / "snapshots.pt")


def test_probes_and_module_norms_as_json_and_csv(client: TestClient, sweep: Path) -> None:
    probes = client.get("/api/runs/3/probes").json()
    assert [p["step"] for p in probes["probes"]] == [1, 4, 8, 12, 16]
    assert probes["alphas"][0] == -1.0 and probes["alphas"][-1] == 3.0
    for p in probes["probes"]:
        assert len(p["losses"]) == len(probes["alphas"])
        assert p["reading"] == read_stride(p["best_alpha"])
    assert probes["typical_alpha"] is not None and probes["reading"]
    csv_lines = client.get("/api/runs/3/probes.csv").text.strip().splitlines()
    assert csv_lines[0].startswith("step,best_alpha,loss_at_-1,loss_at_-0.5,loss_at_0,")
    assert [line.split(",")[0] for line in csv_lines[1:]] == ["1", "4", "8", "12", "16"]

    modules = client.get("/api/runs/3/modules").json()
    assert modules["steps"] == [1, 4, 8, 12, 16]
    assert modules["layers"][:2] == [0, 0] and modules["modules"][:2] == ["q_proj", "q_proj"]
    assert modules["matrices"][:2] == ["A", "B"]
    with sqlite3.connect(sweep / "stepscope.db") as conn:
        stored = conn.execute("SELECT update_norms, param_norms FROM module_norms WHERE run_id = 3 AND step = 8")
        updates, weights = map(json.loads, stored.fetchone())
    i = modules["steps"].index(8)
    assert modules["update_norms"][i] == updates
    assert modules["update_ratios"][i] == pytest.approx([u / w for u, w in zip(updates, weights, strict=True)])
    table = list(csv.DictReader(io.StringIO(client.get("/api/runs/3/modules.csv").text)))
    assert len(table) == len(modules["steps"]) * len(modules["tensors"])  # a row per step and tensor
    at_8 = [r for r in table if r["step"] == "8"]
    assert [r["tensor"] for r in at_8] == modules["tensors"] and at_8[1]["matrix"] == "B"
    assert [float(r["update_norm"]) for r in at_8] == updates  # a float's repr reads back exactly
    assert [float(r["param_norm"]) for r in at_8] == weights
    assert client.get("/api/runs/999/modules.csv").status_code == 404
    assert client.get("/api/runs/999/probes").status_code == 404
    assert client.get("/api/runs/999/modules").status_code == 404


def test_a_run_that_has_not_started_has_an_empty_walk_and_no_map(client: TestClient) -> None:
    queued = client.post("/api/runs", json={"model": "tiny-random-llama", "max_steps": 5})
    assert queued.status_code == 201, queued.text
    run_id = queued.json()["id"]
    modules = client.get(f"/api/runs/{run_id}/modules")
    assert modules.status_code == 200 and modules.json()["tensors"] == [] and modules.json()["steps"] == []
    probes = client.get(f"/api/runs/{run_id}/probes")
    assert probes.status_code == 200 and probes.json()["probes"] == [] and probes.json()["reading"] is None
    refused = client.post("/api/maps", json={"run_ids": [run_id]})
    assert refused.status_code == 409 and f"run {run_id} is queued" in refused.text
