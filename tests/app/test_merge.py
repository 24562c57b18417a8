"""Issue 14's "take the result away": a run's adapter merged into its base model by a real background process,
downloaded as a zip that transformers loads without peft, with the logits of the base model plus the adapter."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bs4 import BeautifulSoup
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from store.db import upgrade
from tests.conftest import until_done
from trainer.cli import main as train

TINY = "tiny-random-llama"
LOOKUP = ["--model", TINY, "--dataset", "synthetic-lookup", "--max-steps", "12", "--eval-every", "0"]
ADAPTER = ("adapter", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two tiny runs with saved adapters, trained once for the module's tests."""
    home = tmp_path_factory.mktemp("merge-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPSCOPE_HOME", str(home))
        mp.delenv("STEPSCOPE_DATABASE_URL", raising=False)
        for _ in range(2):
            assert train([*LOOKUP, "--learning-rate", "1e-2", "--map-snapshots", "0", "--probe-every", "0"]) == 0
        yield home


@pytest.fixture
def client(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("STEPSCOPE_HOME", str(home))
    monkeypatch.setenv("STEPSCOPE_ALLOWED_HOSTS", "testserver")  # Starlette's TestClient's host (tests/conftest.py)
    monkeypatch.delenv("STEPSCOPE_DATABASE_URL", raising=False)
    settings = Settings()
    upgrade(settings.database_url)
    with TestClient(create_app(settings, run_jobs=False)) as client:
        yield client


def wait_for_merge(client: TestClient, run_id: int) -> dict[str, Any]:
    return until_done(client, f"/api/runs/{run_id}/merge")


def test_the_merged_model_gives_the_logits_of_the_base_model_with_the_adapter(
    client: TestClient, home: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.models import load_base

    assert client.get("/api/runs/1/merge").json()["status"] == "none"
    asked = client.post("/api/runs/1/merge")
    assert asked.status_code == 202, asked.text
    assert asked.json()["status"] == "queued"
    again = client.post("/api/runs/1/merge")  # while it is being made: the same merge, not a second job
    assert again.status_code == 200 and again.json()["status"] in ("queued", "running", "completed")
    done = wait_for_merge(client, 1)
    assert done["status"] == "completed", done["error"]
    assert (done["model"], done["dtype"], done["progress"], done["stage"]) == (TINY, "float32", 1.0, None)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(done["files"])
    assert done["download"] == "/api/runs/1/merged.zip"

    answer = client.get(done["download"])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/zip"
    assert 'filename="stepscope-run-1-merged.zip"' in answer.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert archive.testzip() is None  # every file's CRC checks out
        assert sorted(archive.namelist()) == [f"model/{name}" for name in done["files"]]
        assert sum(i.file_size for i in archive.infolist()) == done["size"]
        archive.extractall(tmp_path)
    folder = tmp_path / "model"
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        names = weights.keys()
    assert names and not [k for k in names if "lora" in k]  # folded in: a plain Llama's tensors

    merged = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    base, tok = load_base(TINY, tmp_path / "cache")
    assert AutoTokenizer.from_pretrained(folder).encode("The otter is ") == tok.encode("The otter is ")
    ids = torch.tensor([tok.encode("The otter is amber. The fox is ")])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(home / "runs" / "1" / "adapter")).eval()
        expected = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changed the model, so the check can fail
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()

    # asked again: the stored merge
    assert client.post("/api/runs/1/merge").status_code == 200
    # a new adapter (a resumed run saves one) makes the merge stale: there is none until asked again
    adapter = home / "runs" / "1" / ADAPTER[0] / ADAPTER[1]
    kept = adapter.stat()
    os.utime(adapter, ns=(kept.st_atime_ns, kept.st_mtime_ns + 10**9))
    try:
        assert client.get("/api/runs/1/merge").json()["status"] == "none"
        assert client.get("/api/runs/1/merged.zip").status_code == 409
    finally:
        os.utime(adapter, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert client.get("/api/runs/1/merge").json()["status"] == "completed"


def test_merge_requests_are_checked(client: TestClient, home: Path) -> None:
    for answer in (client.post("/api/runs/99/merge"), client.get("/api/runs/99/merge"),
                   client.get("/api/runs/99/merged.zip")):  # fmt: skip
        assert answer.status_code == 404 and "no run with id 99" in answer.text
    bad = client.post("/api/runs/0/merge")
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["path", "run_id"]
    unmerged = client.get("/api/runs/2/merged.zip")
    assert unmerged.status_code == 409 and "has no merged model (not asked for)" in unmerged.json()["detail"]
    queued = client.post("/api/runs", json={"model": TINY, "dataset": "synthetic-lookup", "max_steps": 5}).json()["id"]
    try:
        refused = client.post(f"/api/runs/{queued}/merge")
        assert refused.status_code == 409 and f"run {queued} is queued" in refused.json()["detail"]
    finally:
        client.post(f"/api/runs/{queued}/cancel")
    folder = home / "runs" / "2"
    (folder / "adapter").rename(folder / "kept")
    try:
        none = client.post("/api/runs/2/merge")
        assert none.status_code == 409 and "run 2 has no saved adapter" in none.json()["detail"]
        assert BeautifulSoup(client.get("/runs/2").text, "html.parser").select_one("#merge-section") is None
    finally:
        (folder / "kept").rename(folder / "adapter")
    assert client.get("/api/runs/2/merge").json()["status"] == "none"  # nothing was started
    by_hand = subprocess.run([sys.executable, "-m", "trainer.merge", "99"], capture_output=True, text=True,
                             env=os.environ | {"STEPSCOPE_HOME": str(home)}, timeout=120)  # fmt: skip
    assert by_hand.returncode == 2 and "run 99 has no saved adapter" in by_hand.stderr


def test_a_failed_merge_says_why_and_starts_again(client: TestClient, home: Path) -> None:
    adapter = home / "runs" / "2" / ADAPTER[0] / ADAPTER[1]
    original = adapter.read_bytes()
    adapter.write_bytes(b"not safetensors")
    try:
        assert client.post("/api/runs/2/merge").status_code == 202
        failed = wait_for_merge(client, 2)
    finally:
        adapter.write_bytes(original)
    assert failed["status"] == "failed" and failed["error"].startswith("The merge failed: ")
    assert failed["stage"] == "loading" and failed["download"] is None
    assert "merge of run 2 failed" in (home / "runs" / "2" / "merged" / "merge.log").read_text()

    # A job that ended without a word (killed): its state names a process that is gone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state_file = home / "runs" / "2" / "merged" / "state.json"
    state = json.loads(state_file.read_text())
    from store.merges import adapter_stamp

    state |= {"status": "running", "pid": gone.pid, "pid_start": 1, "adapter": adapter_stamp(home / "runs" / "2")}
    state_file.write_text(json.dumps(state))
    settled = client.get("/api/runs/2/merge").json()
    assert settled["status"] == "failed" and settled["error"] == "The merge failed: its process ended without a result."

    # The page's button (a CSRF-checked form) starts it again.
    soup = BeautifulSoup(client.get("/runs/2").text, "html.parser")
    section = soup.select_one("#merge-section")
    assert section is not None and section["data-status"] == "failed"
    button = section.select_one("#merge-button")
    assert button is not None and button.text == "Merge into the base model" and not button.has_attr("hidden")
    token = section.select_one("input[name=csrf_token]")
    assert token is not None
    assert client.post("/runs/2/merge", data={}).status_code == 403
    restarted = client.post("/runs/2/merge", data={"csrf_token": token["value"]})
    assert restarted.status_code == 202 and restarted.json() == {"status": "queued"}
    assert wait_for_merge(client, 2)["status"] == "completed"
    link = BeautifulSoup(client.get("/runs/2").text, "html.parser").select_one("#merge-download")
    assert link is not None and link["href"] == "/api/runs/2/merged.zip" and not link.has_attr("hidden")
