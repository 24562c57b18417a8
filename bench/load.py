"""API readers under load while a training job writes: no request may fail.

A real server (`stepscope serve`, a temporary STEPSCOPE_HOME, 127.0.0.1 only) with a few finished
runs of 20,000 steps already recorded, so that compare requests read real volumes. A training job is
created through `POST /api/runs` (tiny-random-llama on synthetic-arithmetic, more steps than the load
lasts); once it records steps, 50 reader threads hit a mix of endpoints for a bounded time and number
of requests:

    GET /api/runs
    GET /api/runs/{live}
    GET /api/runs/{live}/metrics?keys=loss,lr&max_points=1000
    GET /api/compare?ids={live},{finished...}&keys=loss,lr&max_points=1000

A request fails on an exception or a non-2xx answer ("database is locked" is looked for in answers and
in the server's log). The writer must keep writing throughout: its recorded steps are compared before
and after, and its status must still be `running`. The job is cancelled and the server stopped at the end.

    .venv/bin/python bench/load.py                     # 50 readers, 20 s
    .venv/bin/python bench/load.py --readers 10 --seconds 5

It prints latency percentiles and requests/s per endpoint and saves the report to bench/results/load.txt.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "load.txt"
SEEDED_RUNS = 4
JOB = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic", "max_steps": 200_000, "eval_every": 100}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Tally:
    """What the readers saw, appended to under one lock."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    locked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, endpoint: str, seconds: float, failure: str | None) -> None:
        with self.lock:
            self.latencies.setdefault(endpoint, []).append(seconds)
            if failure is not None:
                self.failures.append(f"{endpoint}: {failure}")
                self.locked += "locked" in failure


def seed_runs(home: Path) -> list[int]:
    """Finished runs of 20,000 steps each, written by the trainer's Recorder before the server starts."""
    sys.path.insert(0, str(ROOT / "bench"))
    from storage import make_workload, step_rows

    from store.db import upgrade
    from store.tables import RunStatus
    from trainer.config import make_config
    from trainer.recorder import Recorder, new_run

    db = home / "stepscope.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    data = make_workload()
    ids = []
    for r in range(SEEDED_RUNS):
        run_id = new_run(url, make_config({"model": "tiny-random-llama", "name": f"seeded-{r}"}))
        recorder = Recorder(db, run_id)
        rows = step_rows(data, r)
        recorder.steps(rows)
        recorder.update_run(status=RunStatus.completed, steps_done=len(rows), last_loss=rows[-1][4])
        recorder.close()
        ids.append(run_id)
    return ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(client: httpx.Client, path: str, ready: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = client.get(path)
            if response.status_code == 200 and ready(body := response.json()):
                return dict(body)
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def reader(
    base: str,
    paths: list[tuple[str, str]],
    start: int,
    deadline: float,
    budget: itertools.count,
    limit: int,
    tally: Tally,
) -> None:
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as client:
        for i in itertools.count(start):
            if time.monotonic() >= deadline or next(budget) >= limit:
                return
            endpoint, path = paths[i % len(paths)]
            begin = time.perf_counter()
            failure = None
            try:
                response = client.get(path)
                if not 200 <= response.status_code < 300:
                    failure = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            tally.add(endpoint, time.perf_counter() - begin, failure)


def percentiles(values: list[float]) -> str:
    ms = np.array(values) * 1e3
    p50, p99 = np.percentile(ms, [50, 99])
    return f"{len(ms):>7,}  {p50:>8.1f}  {p99:>8.1f}  {ms.max():>8.1f}"


def run_load(args: argparse.Namespace, home: Path) -> str:
    seeded = seed_runs(home)
    log(f"seeded {len(seeded)} finished runs of 20,000 steps")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSCOPE_")}
    env |= {"STEPSCOPE_HOME": str(home), "STEPSCOPE_HOST": "127.0.0.1", "STEPSCOPE_PORT": str(port),
            "STEPSCOPE_MAX_CONCURRENT_RUNS": "1", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with (home / "server.log").open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    client = httpx.Client(base_url=base, timeout=60, trust_env=False)
    live = None
    try:
        wait_for(client, "/api/health", lambda body: body.get("status") == "ok", 120, "the server")
        response = client.post("/api/runs", json=JOB)
        response.raise_for_status()
        live = response.json()["id"]
        log(f"created run {live}; waiting for it to record steps")
        wait_for(client, f"/api/runs/{live}", lambda b: b["status"] == "running" and b["steps_done"] > 0, 300, "steps")

        ids = ",".join(map(str, [live, *seeded]))
        paths = [
            ("GET /api/runs", "/api/runs"),
            ("GET /api/runs/{id}", f"/api/runs/{live}"),
            ("GET /api/runs/{id}/metrics", f"/api/runs/{live}/metrics?keys=loss,lr&max_points=1000"),
            ("GET /api/compare", f"/api/compare?ids={ids}&keys=loss,lr&max_points=1000"),
        ]
        # The same mix from one reader first: what each request costs when it does not queue.
        alone = Tally()
        reader(base, paths, 0, time.monotonic() + args.baseline_seconds, itertools.count(), 10**9, alone)
        before = client.get(f"/api/runs/{live}").json()
        tally = Tally()
        budget = itertools.count()
        started = time.monotonic()
        deadline = started + args.seconds
        threads = [
            threading.Thread(target=reader, args=(base, paths, i, deadline, budget, args.max_requests, tally))
            for i in range(args.readers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        after = client.get(f"/api/runs/{live}").json()
        log(f"load done: {sum(map(len, tally.latencies.values()))} requests in {elapsed:.1f} s")
    finally:
        if live is not None:
            client.post(f"/api/runs/{live}/cancel")
            final = wait_for(client, f"/api/runs/{live}", lambda b: b["status"] != "running", 60, "the cancel")
            log(f"run {live} is {final['status']}")
        client.close()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    server_locked = (home / "server.log").read_text(errors="replace").count("database is locked")
    return describe(args, alone, tally, elapsed, before, after, server_locked, len(seeded))


def describe(
    args: argparse.Namespace,
    alone: Tally,
    tally: Tally,
    elapsed: float,
    before: dict[str, Any],
    after: dict[str, Any],
    server_locked: int,
    seeded: int,
) -> str:
    every = [x for values in tally.latencies.values() for x in values]
    steps = after["steps_done"] - before["steps_done"]
    lines = [
        f"{args.readers} concurrent readers on 127.0.0.1 for {elapsed:.1f} s while run {after['id']} trains "
        f"({JOB['model']}, {JOB['dataset']}); compare reads it and {seeded} finished runs of 20,000 steps.",
        "",
        f"{'endpoint':<28}  {'requests':>7}  {'p50 ms':>8}  {'p99 ms':>8}  {'max ms':>8}",
    ]
    for endpoint, values in tally.latencies.items():
        lines.append(f"{endpoint:<28}  {percentiles(values)}")
    lines.append(f"{'all':<28}  {percentiles(every)}")
    lines += ["", f"The same mix from 1 reader for {args.baseline_seconds:.0f} s just before (no queueing):"]
    lines += [f"{endpoint:<28}  {percentiles(values)}" for endpoint, values in alone.latencies.items()]
    lines += [
        "",
        f"throughput: {len(every) / elapsed:,.0f} requests/s",
        f"failures: {len(tally.failures)} of {len(every):,} requests ('database is locked': {tally.locked} in "
        f"answers, {server_locked} in the server's log)",
        *(f"  {failure}" for failure in tally.failures[:10]),
        f"writer: steps_done {before['steps_done']} -> {after['steps_done']} during the load "
        f"({steps / elapsed:,.1f} steps/s), status {after['status']}",
        "",
        f"{'PASS' if not tally.failures and not alone.failures and server_locked == 0 else 'FAIL'}  no request failed",
        f"{'PASS' if steps > 0 and after['status'] == 'running' else 'FAIL'}  the job kept writing during the load",
        "",
        f"{os.cpu_count()} CPUs shared by the server, the training job and the readers; load average at the end: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the readers read")
    parser.add_argument("--baseline-seconds", type=float, default=5.0, help="one reader alone first, this long")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop earlier after this many requests")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to save the printed report")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="stepscope-load-bench-"))
    try:
        text = run_load(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    if "FAIL" in text:
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
