"""Recording from your own script: the Hugging Face callback's overhead, and ingest over HTTP.

1. Callback overhead: the same `transformers.Trainer` steps with `StepscopeCallback` and without, in one
   process, blocks alternating (with, without, without, with, ...) so drift in machine speed hits both
   sides alike; the median block time per step is compared. The callback records into a real
   `stepscope serve` on loopback.
2. Ingest: the same step rows (N steps x the 12 standard columns) written through the client into that
   server (`stepscope.init` / `run.log` / `run.finish`, until the server has them all), and through the
   engine's direct SQLite writer (`trainer.recorder.Recorder`), in points per second.

    .venv/bin/python bench/client.py                       # default model, batch 4x128 (the issue's target)
    .venv/bin/python bench/client.py --model tiny-random-llama --blocks 4 --block-steps 20

The lines to read are `callback ratio X.XXX` (target <= 1.02) and `ingest ... points/s`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import stepscope  # noqa: E402
from stepscope.hf import StepscopeCallback  # noqa: E402
from store.db import upgrade  # noqa: E402
from store.tables import STEP_COLUMNS, RunStatus  # noqa: E402
from trainer.config import TrainConfig, make_config  # noqa: E402
from trainer.models import add_lora, load_base  # noqa: E402
from trainer.recorder import Recorder, new_run  # noqa: E402


def serve(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSCOPE_")} | {"STEPSCOPE_HOME": str(home)}
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=log)  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def callback_overhead(args: argparse.Namespace, home: Path, url: str) -> tuple[float, float]:
    model, tok = load_base(args.model, home / "models")
    model = add_lora(model, TrainConfig(model=args.model))
    rows = torch.randint(3, len(tok), (512, args.max_seq_len), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in rows]

    def block(with_callback: bool) -> float:
        training = TrainingArguments(
            output_dir=str(home / "out"), max_steps=args.block_steps, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4, logging_steps=10_000, report_to="none", save_strategy="no", use_cpu=True,
            disable_tqdm=True, max_grad_norm=1.0,
        )  # fmt: skip
        callbacks = [StepscopeCallback(url, name="bench", spool_dir=home / "spool")] if with_callback else []
        trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=callbacks)
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / args.block_steps

    block(True)  # warm-up: the first steps pay for allocations and the server's first requests
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.blocks):
        for side in (True, False) if i % 2 == 0 else (False, True):
            times[side].append(block(side))
    return statistics.median(times[True]), statistics.median(times[False])


def rows(n: int) -> list[dict[str, Any]]:
    return [
        {c: float(step % 97) / 7 + 1 for c in STEP_COLUMNS} | {"step": step, "skipped": 0} for step in range(1, n + 1)
    ]


def ingest_http(url: str, n: int, home: Path) -> float:
    run = stepscope.init(server=url, name="ingest", spool_dir=home / "spool-ingest", handle_sigterm=False)
    data = rows(n)
    start = time.perf_counter()
    for row in data:
        step = row.pop("step")
        run.log(row, step=step)
    run.finish()
    return n * len(STEP_COLUMNS) / (time.perf_counter() - start)


def ingest_direct(home: Path, n: int) -> float:
    db = home / "stepscope.db"
    run_id = new_run(f"sqlite:///{db}", make_config({"model": "tiny-random-llama"}))
    recorder = Recorder(db, run_id)
    data = [(r["step"], *(r[c] for c in STEP_COLUMNS)) for r in rows(n)]
    start = time.perf_counter()
    for i in range(0, n, 32):  # as the loop hands them over: a batch per flush
        recorder.steps(data[i : i + 32])
    recorder.update_run(status=RunStatus.completed)
    recorder.close()
    return n * len(STEP_COLUMNS) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per side")
    parser.add_argument("--block-steps", type=int, default=10)
    parser.add_argument("--ingest-steps", type=int, default=20_000)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="stepscope-bench-client-"))
    upgrade(f"sqlite:///{home / 'stepscope.db'}")
    server = serve(home, args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        with_cb, without = callback_overhead(args, home, url)
        shape = f"batch {args.batch_size}x{args.max_seq_len}, {args.blocks} blocks of {args.block_steps} steps"
        print(f"model {args.model}, {shape}")
        print(f"step time, with the callback   : {with_cb * 1000:8.2f} ms")
        print(f"step time, without the callback: {without * 1000:8.2f} ms")
        print(f"callback ratio {with_cb / without:.3f}")
        http = ingest_http(url, args.ingest_steps, home)
        direct = ingest_direct(home, args.ingest_steps)
        print(f"ingest over HTTP through the client: {http:12,.0f} points/s ({args.ingest_steps} steps)")
        print(f"ingest through the direct writer   : {direct:12,.0f} points/s")
        print(f"direct / HTTP {direct / http:.1f}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
