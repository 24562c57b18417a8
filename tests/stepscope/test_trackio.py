"""Scripts that log with the real `trackio` package record into a real stepscope server, unchanged.

The scripts run in their own processes with only Trackio's environment variables set, as a user's would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from app.config import Settings
from app.main import create_app
from app.runner.recovery import settle_if_silent
from store.db import make_engine
from store.tables import Run, utcnow
from tests.browser.conftest import REPO
from tests.conftest import wait_for
from tests.stepscope.conftest import Server

pytest.importorskip("trackio")  # the dev extra installs it


def _script(code: str, server: Server, tmp_path: Path, nothing_kept: bool = True) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPSCOPE_", "TRACKIO_"))} | {
        "TRACKIO_SERVER_URL": server.url,
        "TRACKIO_WRITE_TOKEN": "unused-without-a-stepscope-token",
        "TRACKIO_DIR": str(tmp_path / "trackio"),  # where the client would keep what it could not send
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert not nothing_kept or not (tmp_path / "trackio").exists() or not list((tmp_path / "trackio").rglob("*.db")), (
        "the client kept rows locally: a call failed\n" + done.stdout + done.stderr[-4000:]
    )


def _only_run(server: Server) -> dict[str, Any]:
    runs = server.get("/api/runs")
    items = runs["data"]
    assert len(items) == 1, items
    return dict(server.get(f"/api/runs/{items[0]['id']}"))


def test_trackio_init_log_finish_records_every_step(server: Server, tmp_path: Path) -> None:
    _script(
        """
        import trackio
        trackio.init(project="lora", name="plain", config={"learning_rate": 2e-4, "r": 8})
        for step in range(1, 41):
            trackio.log({"loss": 3.0 - step / 100, "lr": 2e-4, "accuracy": step / 40, "note": "text"}, step=step)
        trackio.log({"eval/loss": 2.5, "eval/accuracy": 0.9}, step=40)
        trackio.finish()
        """,
        server,
        tmp_path,
    )
    run = _only_run(server)
    assert (run["name"], run["kind"], run["status"], run["steps_done"]) == ("plain", "external", "running", 40)
    assert run["learning_rate"] == 2e-4 and run["config"]["r"] == 8
    assert run["config"]["stepscope_source"] == "trackio"
    got = server.get(f"/api/runs/{run['id']}/metrics?keys=loss,lr,accuracy,eval_loss,eval/accuracy")
    assert got["steps"] == list(range(1, 41))
    assert got["series"]["loss"] == pytest.approx([3.0 - s / 100 for s in range(1, 41)])
    assert got["series"]["accuracy"][-1] == 1.0 and got["series"]["eval_loss"][-1] == 2.5
    assert got["series"]["eval/accuracy"][-1] == 0.9
    assert server.get(f"/api/runs/{run['id']}/metric-keys")["custom"] == ["accuracy", "eval/accuracy"]
    assert server.get(f"/api/runs/{run['id']}/summary")["verdict"] is not None  # scored like any run


TRAINER_SCRIPT = """
import json, sys, torch
from transformers import Trainer, TrainingArguments
from trainer.config import TrainConfig
from trainer.models import add_lora, load_base

out = sys.argv[1]
model, tok = load_base("tiny-random-llama", out + "/models")
model = add_lora(model, TrainConfig(model="tiny-random-llama"))
ids = torch.randint(3, len(tok), (48, 16), generator=torch.Generator().manual_seed(0))
data = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in ids]
args = TrainingArguments(
    output_dir=out + "/out", max_steps=12, per_device_train_batch_size=4, learning_rate=5e-2,
    logging_steps=1, eval_strategy="steps", eval_steps=6, per_device_eval_batch_size=8, report_to="trackio",
    run_name="hf-trackio", project="lora", save_strategy="no", use_cpu=True, disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8])
trainer.train()
json.dump(trainer.state.log_history, open(out + "/history.json", "w"))
"""


def test_an_hf_trainer_reporting_to_trackio_records_every_optimizer_step(server: Server, tmp_path: Path) -> None:
    _script(f"import sys; sys.argv = ['-', {str(tmp_path)!r}]\n" + TRAINER_SCRIPT, server, tmp_path)
    history = json.loads((tmp_path / "history.json").read_text())
    logged = [h for h in history if "grad_norm" in h]
    run = _only_run(server)
    assert (run["name"], run["status"], run["steps_done"], run["learning_rate"]) == ("hf-trackio", "running", 12, 5e-2)
    got = server.get(f"/api/runs/{run['id']}/metrics?keys=loss,lr,grad_norm,epoch,eval_loss")
    assert got["steps"] == [h["step"] for h in logged] == list(range(1, 13))  # the optimizer steps, once each
    assert got["series"]["loss"] == pytest.approx([h["loss"] for h in logged])
    assert got["series"]["lr"] == pytest.approx([h["learning_rate"] for h in logged])
    assert got["series"]["grad_norm"] == pytest.approx([h["grad_norm"] for h in logged])
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert set(evals) == {6, 12}
    assert [got["series"]["eval_loss"][s - 1] for s in (6, 12)] == pytest.approx([evals[6], evals[12]])
    assert "eval/runtime" in server.get(f"/api/runs/{run['id']}/metric-keys")["custom"]
    assert server.get(f"/api/runs/{run['id']}/summary")["n_steps"] == 12


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_jobs=False)) as client:
        yield client


def _log(project: str, run_id: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"project": project, "run": "r", "run_id": run_id, "metrics": metrics, "step": step, "config": None}


def test_silence_completes_a_trackio_run_and_speaking_again_reopens_it(client: TestClient, settings: Settings) -> None:
    assert client.get("/version").json()["api_version"] == 1
    odd = {"lr": -1.0, "odd key": 2, "step": 7.5, "samples": 1.5, "big": 10**400}  # each left out
    call = {"kwargs": {"logs": [_log("p", "a", s, {"loss": 1.0, "eval_loss": 2.0, **odd}) for s in range(3)]}}
    assert client.post("/api/bulk_log", json=call).json() == {"data": None}
    assert client.post("/api/bulk_log", json=call).json() == {"data": None}  # sent again: nothing more
    [run] = client.get("/api/runs").json()["data"]
    got = client.get(f"/api/runs/{run['id']}/metrics?keys=loss,lr,samples,eval_loss").json()
    assert got["steps"] == [0, 1, 2] and got["series"]["lr"] == got["series"]["samples"] == [None] * 3
    assert got["series"]["loss"] == [1.0] * 3 and got["series"]["eval_loss"] == [2.0] * 3
    assert client.get(f"/api/runs/{run['id']}/metric-keys").json()["custom"] == []

    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        row = session.get(Run, run["id"])
        assert row is not None
        assert settle_if_silent(engine, row, now=utcnow() + timedelta(seconds=61))
    assert client.get(f"/api/runs/{run['id']}").json()["status"] == "completed"
    client.post("/api/bulk_log", json={"kwargs": {"logs": [_log("p", "a", 3, {"loss": 0.5})]}})
    again = client.get(f"/api/runs/{run['id']}").json()
    assert (again["status"], again["steps_done"]) == ("running", 3)
    engine.dispose()


def test_bad_trackio_calls_get_422_and_the_token_is_checked(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"token": "s3cret"}), run_jobs=False)) as client:
        call = {"kwargs": {"logs": [_log("p", "a", 1, {"loss": 1.0})]}}
        assert client.post("/api/bulk_log", json=call).status_code == 401
        assert client.post("/api/bulk_log", json=call, headers={"X-Trackio-Write-Token": "s3cret"}).status_code == 200
        bad = client.post(
            "/api/bulk_log", json={"kwargs": {"logs": [{"run": "r"}]}}, headers={"X-Trackio-Write-Token": "s3cret"}
        )
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "kwargs", "logs", 0, "project"]


def test_rows_logged_while_the_server_is_down_arrive_once_it_is_back(server: Server, tmp_path: Path) -> None:
    half, go = tmp_path / "half", tmp_path / "go"
    code = f"""
        import pathlib, time, trackio
        trackio.init(project="lora", name="outage")
        for step in range(1, 21):
            trackio.log({{"loss": 3.0 - step / 100}}, step=step)
        time.sleep(2)  # sent
        pathlib.Path({str(half)!r}).touch()
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.1)
        for step in range(21, 41):  # the server is down: Trackio's client keeps these locally
            trackio.log({{"loss": 3.0 - step / 100}}, step=step)
        time.sleep(2)
        pathlib.Path({str(half)!r}).unlink()
        while pathlib.Path({str(go)!r}).exists():
            time.sleep(0.1)
        trackio.finish()
        """
    with ThreadPoolExecutor(1) as pool:
        script = pool.submit(_script, code, server, tmp_path, False)
        _outage(server, half, go)
        script.result(120)  # the script's own asserts
    assert list((tmp_path / "trackio").rglob("*.db")), "the client never kept a row: the outage tested nothing"
    run = _only_run(server)
    got = server.get(f"/api/runs/{run['id']}/metrics?keys=loss")
    assert got["steps"] == list(range(1, 41)) and run["steps_done"] == 40  # each once


def _outage(server: Server, half: Path, go: Path) -> None:
    """Stop the server once the script says its first rows went out; start it again once it logged the rest."""
    wait_for(half.exists, 60, "the first rows to be sent")
    server.stop()
    go.touch()
    wait_for(lambda: not half.exists(), 60, "the rows to be logged while the server is down")
    server.start()
    go.unlink()
