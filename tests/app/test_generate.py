"""/api/generate (answers of base models and runs' adapters, whole or streamed), a run's recorded answers,
and its adapter as a zip that peft loads back into the very model the run trained."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from store.db import upgrade
from trainer.cli import main as train

TINY = "tiny-random-llama"
LOOKUP = ["--model", TINY, "--dataset", "synthetic-lookup", "--max-steps", "40", "--eval-every", "20"]
PROMPT = "The otter is "  # the lookup's answer: amber


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Run 1 trained at a good rate (it answers the lookup), run 2 at a rate too small to learn it."""
    home = tmp_path_factory.mktemp("generate-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPSCOPE_HOME", str(home))
        mp.delenv("STEPSCOPE_DATABASE_URL", raising=False)
        for lr in ("1e-2", "1e-5"):
            assert train([*LOOKUP, "--learning-rate", lr, "--batch-size", "16"]) == 0
        yield home


@pytest.fixture
def client(trained_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("STEPSCOPE_HOME", str(trained_home))
    monkeypatch.setenv("STEPSCOPE_ALLOWED_HOSTS", "testserver")
    monkeypatch.delenv("STEPSCOPE_DATABASE_URL", raising=False)
    settings = Settings()
    upgrade(settings.database_url)
    with TestClient(create_app(settings, run_jobs=False)) as client:
        yield client


def test_one_answer_per_run_and_the_base_model(client: TestClient) -> None:
    answer = client.post("/api/generate", json={"prompt": PROMPT, "run_ids": [1, 2], "max_new_tokens": 8})
    assert answer.status_code == 200, answer.text
    answers = answer.json()["answers"]
    assert [(a["key"], a["run_id"], a["learning_rate"]) for a in answers] == [
        (f"base:{TINY}", None, None), ("run:1", 1, 1e-2), ("run:2", 2, 1e-5),
    ]  # fmt: skip
    texts = {a["key"]: a["text"] for a in answers}
    assert texts["run:1"] == "amber"  # what it learnt
    assert texts["run:2"] != "amber" and texts[f"base:{TINY}"] != "amber"
    # the same greedy answer the run recorded at its last eval step
    recorded = client.get("/api/runs/1/generations").json()
    index = next(p["index"] for p in recorded["prompts"] if p["prompt"] == PROMPT)
    assert recorded["steps"][-1]["answers"][index]["output"] == texts["run:1"]


def test_the_stream_fills_the_columns_together_and_adds_up_to_the_answers(client: TestClient) -> None:
    body = {"prompt": PROMPT, "run_ids": [2, 1], "max_new_tokens": 6}
    whole = {a["key"]: a["text"] for a in client.post("/api/generate", json=body).json()["answers"]}
    with client.stream("POST", "/api/generate/stream", json=body) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in answer.iter_lines() if line]
    assert events[0]["event"] == "start"
    assert [s["key"] for s in events[0]["sources"]] == [f"base:{TINY}", "run:2", "run:1"]
    assert events[-1] == {"event": "done"}
    streamed: dict[str, str] = {}
    for event in events:
        if event["event"] == "token":
            streamed[event["key"]] = streamed.get(event["key"], "") + event["text"]
    assert streamed == whole
    first_end = next(i for i, e in enumerate(events) if e["event"] == "end")
    assert len({e["key"] for e in events[:first_end] if e["event"] == "token"}) == 3  # round robin, not one by one


def test_sampling_follows_its_seed(client: TestClient) -> None:
    body = {"prompt": PROMPT, "run_ids": [2], "base": False, "temperature": 1.5, "top_p": 0.95, "max_new_tokens": 12}
    texts = [client.post("/api/generate", json={**body, "seed": s}).json()["answers"][0]["text"] for s in (1, 1, 2)]
    assert texts[0] == texts[1] != texts[2]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 5000}, "max_new_tokens"),
        ({"run_ids": [1, 2, 1]}, "run_ids"),
        ({"run_ids": [1, 2, 3, 4, 5]}, "run_ids"),
        ({"run_ids": [], "base": False}, "run_ids"),
        ({"run_ids": [], "model": "no-such-model"}, "model"),
        ({"run_ids": []}, "model"),
        ({"model": TINY}, "model"),  # with runs: their base models answer
        ({"prompt": ""}, "prompt"),
        ({"stream": True}, "stream"),
    ],
)
def test_bad_settings_are_422_naming_the_field(client: TestClient, body: dict[str, object], field: str) -> None:
    for path in ("/api/generate", "/api/generate/stream"):
        answer = client.post(path, json={"prompt": PROMPT, "run_ids": [1], **body})
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"][:2] == ["body", field]


def test_unknown_runs_are_404_and_runs_without_an_adapter_409(client: TestClient) -> None:
    assert client.post("/api/generate", json={"prompt": PROMPT, "run_ids": [1, 99]}).status_code == 404
    assert client.post("/api/generate/stream", json={"prompt": PROMPT, "run_ids": [99]}).status_code == 404
    queued = client.post("/api/runs", json={"model": TINY, "dataset": "synthetic-lookup", "max_steps": 5}).json()["id"]
    answer = client.post("/api/generate", json={"prompt": PROMPT, "run_ids": [queued]})
    assert answer.status_code == 409 and "no saved adapter" in answer.json()["detail"]
    assert client.get(f"/api/runs/{queued}/adapter.zip").status_code == 409
    assert client.get("/api/runs/99/adapter.zip").status_code == 404
    assert client.get("/api/runs/99/generations").status_code == 404
    assert client.delete(f"/api/runs/{queued}").status_code == 409  # queued: cancel first
    client.post(f"/api/runs/{queued}/cancel")


def test_models_are_loaded_once_and_kept_within_the_budget(client: TestClient) -> None:
    playground = client.app.state.playground  # type: ignore[attr-defined]
    body = {"prompt": PROMPT, "run_ids": [1, 2], "max_new_tokens": 2}
    client.post("/api/generate", json=body)
    base = playground._bases[TINY].model
    assert playground.loaded() == [f"base:{TINY}", "run:1", "run:2"]
    client.post("/api/generate", json={**body, "run_ids": [2]})
    assert playground._bases[TINY].model is base  # shared, not loaded again
    assert playground.loaded() == ["run:1", f"base:{TINY}", "run:2"]  # least recently used first
    playground.budget_bytes = playground.used_bytes - 1  # one adapter too many: the least recently used goes
    answer = client.post("/api/generate", json={**body, "run_ids": [2], "max_new_tokens": 8})
    assert playground.loaded() == [f"base:{TINY}", "run:2"]
    playground.budget_bytes = 1  # less than any model: each request loads what it needs and lets it go after
    again = client.post("/api/generate", json={**body, "run_ids": [2], "max_new_tokens": 8})
    assert again.json() == answer.json() and playground.loaded() == []


def test_recorded_answers_by_eval_step(client: TestClient) -> None:
    recorded = client.get("/api/runs/1/generations").json()
    assert len(recorded["prompts"]) == 8 and all(p["expected"] for p in recorded["prompts"])
    assert [s["step"] for s in recorded["steps"]] == [20, 40]
    assert all(len(s["answers"]) == 8 for s in recorded["steps"])
    keys = client.get("/api/runs/1/metric-keys").json()["custom"]
    assert keys == ["eval/exact_match", "eval/token_overlap"]
    accuracy = client.get("/api/runs/1/metrics", params={"keys": "eval/exact_match"}).json()
    assert accuracy["steps"] == [20, 40] and accuracy["series"]["eval/exact_match"][-1] >= 0.875
    table = list(csv.DictReader(io.StringIO(client.get("/api/runs/1/metrics.csv").text)))
    assert [float(r["eval/exact_match"]) for r in table if r["eval/exact_match"]] == accuracy["series"][
        "eval/exact_match"
    ]


def test_the_downloaded_adapter_is_the_trained_model(client: TestClient, tmp_path: Path, trained_home: Path) -> None:
    """Reloaded with peft from the zip, the adapter gives the run's own final eval loss (so the same logits as
    the model that finished training) and the same logits as the adapter in the run's folder."""
    import torch
    from peft import PeftModel

    from trainer.batches import eval_batches, tokenize
    from trainer.data import load_examples
    from trainer.models import load_base

    answer = client.get("/api/runs/1/adapter.zip")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    assert 'filename="stepscope-run-1-adapter.zip"' in answer.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(archive.namelist())
        archive.extractall(tmp_path)
    base, tok = load_base(TINY, tmp_path)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    _, examples = load_examples("synthetic-lookup", tmp_path, seed=42)
    batches = eval_batches([tokenize(e, tok, 128) for e in examples], 8, tok.pad_token_id)
    n_items = sum(b.n_loss_tokens for b in batches)
    with torch.no_grad():
        loss = sum(
            float(model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                        num_items_in_batch=n_items).loss)
            for b in batches
        )  # fmt: skip
        logits = model(input_ids=batches[0].input_ids).logits
        original, _ = load_base(TINY, tmp_path)
        in_folder = PeftModel.from_pretrained(original, str(trained_home / "runs" / "1" / "adapter")).eval()
        assert torch.equal(in_folder(input_ids=batches[0].input_ids).logits, logits)
    with sqlite3.connect(trained_home / "stepscope.db") as conn:
        (recorded,) = conn.execute("SELECT eval_loss FROM eval_metrics WHERE run_id = 1 AND step = 40").fetchone()
    assert loss == pytest.approx(recorded, rel=1e-5)


def test_the_playground_page_offers_the_runs_with_adapters(client: TestClient) -> None:
    from bs4 import BeautifulSoup

    answer = client.get("/playground?ids=2")
    assert answer.status_code == 200
    soup = BeautifulSoup(answer.text, "html.parser")
    assert soup.select_one('nav a[href="/playground"]') is not None
    boxes = {int(b["value"]): b.has_attr("checked") for b in soup.select('input[name="run"]')}
    assert boxes == {1: False, 2: True}  # both finished with an adapter; the one asked for is ticked
    labels = [label.get_text(" ", strip=True) for label in soup.select("#playground-runs label")]
    assert any("1e-2" in text for text in labels) and any("1e-5" in text for text in labels)
    assert soup.select_one("textarea#prompt") is not None and soup.select_one("#max_new_tokens")["max"] == "1024"
    compare = BeautifulSoup(client.get("/compare?ids=1,2").text, "html.parser")
    assert compare.select_one("section#answers table#answers-table") is not None
    assert compare.select_one("#answers-playground")["href"] == "/playground?ids=2,1"  # by learning rate


def test_the_playground_streams_only_with_the_pages_csrf_token(client: TestClient) -> None:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(client.get("/playground").text, "html.parser")
    token = soup.select_one("#playground-form")["data-csrf"]
    body = {"prompt": PROMPT, "run_ids": [1], "max_new_tokens": 6}
    assert client.post("/playground/generate", json=body).status_code == 403
    assert client.post("/playground/generate", json=body, headers={"X-CSRF-Token": "x" * 43}).status_code == 403
    answer = client.post("/playground/generate", json=body, headers={"X-CSRF-Token": token})
    assert answer.status_code == 200
    events = [json.loads(line) for line in answer.text.splitlines()]
    assert "".join(e["text"] for e in events if e["event"] == "token" and e["key"] == "run:1") == "amber"
    bad = client.post("/playground/generate", json={**body, "top_p": 2}, headers={"X-CSRF-Token": token})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "top_p"]


def test_a_load_that_fails_leaves_nothing_pinned_and_deleting_a_run_deletes_its_answers(
    settings: Settings, db: sqlite3.Connection, tmp_path: Path
) -> None:
    from app.playground import Playground, Source
    from store.generations import write_generations

    playground = Playground(2**30, tmp_path, threads=1)
    missing = Source(TINY, 7, tmp_path / "no-adapter")
    with pytest.raises(ValueError):
        playground.open([Source(TINY), missing])
    assert not +playground._pins and playground.loaded() == [f"base:{TINY}"]  # the base loaded; nothing in use

    db.execute(
        "INSERT INTO runs (name, kind, status, model, dataset, learning_rate, batch_size, optimizer, config, "
        "created_at, steps_done) VALUES ('r', 'train', 'completed', ?, 'synthetic-lookup', 0.01, 8, 'adamw', '{}', "
        "'2026-01-01 00:00:00.000000', 0)",
        (TINY,),
    )
    db.execute("BEGIN")
    write_generations(db, 1, [(20, 0, "The otter is ", "amber", "amber", True, 1.0)])
    db.execute("COMMIT")
    with TestClient(create_app(settings, run_jobs=False)) as client:
        assert client.get("/api/runs/1/generations").json()["steps"][0]["answers"][0]["output"] == "amber"
        assert client.delete("/api/runs/1").status_code == 204
    assert db.execute("SELECT count(*) FROM generations").fetchone() == (0,)
