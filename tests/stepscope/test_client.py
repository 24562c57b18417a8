"""The client library against a real server: a plain peft loop, a restart mid-run, a killed client, no torch."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stepscope
from tests.browser.conftest import REPO
from tests.conftest import wait_for
from tests.stepscope.conftest import Server

NO_TORCH = """
import sys
import stepscope
print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'fastapi', 'app', 'trainer', 'store'}))
"""


def test_import_stepscope_imports_neither_torch_nor_the_server() -> None:
    done = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _steps(server: Server, run_id: int) -> list[tuple[int, int]]:
    with sqlite3.connect(server.home / "stepscope.db") as conn:
        return conn.execute(
            "SELECT count(*), count(DISTINCT step) FROM step_metrics WHERE run_id = ?", (run_id,)
        ).fetchall()


def test_a_plain_peft_loop_records_every_step_with_custom_metrics(server: Server, spool: Path, tmp_path: Path) -> None:
    import torch

    from trainer.config import TrainConfig
    from trainer.models import add_lora, load_base

    model, tok = load_base("tiny-random-llama", tmp_path / "models")
    model = add_lora(model, TrainConfig(model="tiny-random-llama"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, len(tok), (4, 16), generator=torch.Generator().manual_seed(0))
    run = stepscope.init(server.url, name="plain loop", config={"lr": 1e-2, "lora_r": 8}, spool_dir=spool)
    for step in range(1, 41):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        run.log({"loss": loss.item(), "lr": 1e-2, "token_accuracy": step / 40}, step=step)
    run.finish()
    assert run.id is not None
    answer = server.get(f"/api/runs/{run.id}")
    assert (answer["status"], answer["kind"], answer["steps_done"]) == ("completed", "external", 40)
    assert answer["summary"]["n_steps"] == 40 and answer["verdict"] in ("ok", "too_low", "too_high", "diverged")
    metrics = server.get(f"/api/runs/{run.id}/metrics?keys=loss,token_accuracy")
    assert metrics["steps"] == list(range(1, 41)) and metrics["series"]["token_accuracy"][-1] == 1.0
    assert "token_accuracy" in server.get(f"/api/runs/{run.id}/metrics.csv").splitlines()[0]


def test_a_server_restart_mid_run_loses_and_duplicates_nothing(server: Server, spool: Path) -> None:
    run = stepscope.init(server.url, name="restart", spool_dir=spool)
    for step in range(1, 61):
        run.log({"loss": 1 / step, "seen": step}, step=step)
        time.sleep(0.03)
        if step == 20:
            time.sleep(1.5)  # the first rows reach the server
            server.stop()
        if step == 40:
            time.sleep(1.5)  # rows go to the spool
            assert any(spool.glob("*.jsonl")), "nothing was spooled while the server was down"
            server.start()
    run.finish()
    assert run.id is not None
    assert _steps(server, run.id) == [(60, 60)]
    assert server.get(f"/api/runs/{run.id}")["status"] == "completed"
    assert not list(spool.glob("*.jsonl"))


KILLED = """
import sys, time
import stepscope
run = stepscope.init(sys.argv[1], name=sys.argv[3], spool_dir=sys.argv[2], heartbeat_seconds=2)
print(run.id, flush=True)
for step in range(1, 100000):
    run.log({"loss": 1.0}, step=step)
    time.sleep(0.01)
    if sys.argv[3] == "exits" and step == 50:
        break
"""


@pytest.mark.parametrize("how", ["killed", "exits"])
def test_a_client_that_ends_without_finish_leaves_its_run_interrupted(server: Server, spool: Path, how: str) -> None:
    script = subprocess.Popen(
        [sys.executable, "-c", KILLED, server.url, str(spool), how], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert script.stdout is not None
    run_id = int(script.stdout.readline())
    wait_for(lambda: server.get(f"/api/runs/{run_id}")["steps_done"] > 0, 30, "the first rows")
    if how == "killed":
        script.send_signal(signal.SIGKILL)
    script.wait(30)
    run = wait_for(lambda: (r := server.get(f"/api/runs/{run_id}"))["status"] != "running" and r, 30, "the run to end")
    assert run["status"] == "interrupted"
