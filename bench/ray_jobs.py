"""Running through Ray: the extra time to first step against the local executor, and the HTTP recorder's
cost against the direct SQLite writer.

1. Time to first step: `stepscope serve` with STEPSCOPE_EXECUTOR=local, then =ray on a one-node cluster
   started here (`ray start --head --num-cpus 2`, free ports, stopped at the end); POST /api/runs of the
   tiny model, and the seconds until its first step row is in the database. Median of --repeats runs each.
2. Recording: the same synthetic step rows (--rows, in batches of 50 as the training loop hands them over)
   through `trainer.recorder.Recorder` (SQLite) and `trainer.http_recorder.HttpRecorder` (into a real
   server on loopback), timed until the last row is stored: rows per second and the ratio.
3. A whole run: the tiny model's --steps steps recorded directly (`python -m trainer --run-id N`) and over
   HTTP (`--server URL`), and over HTTP from a node of its own (STEPSCOPE_JOB_HOME: it also sends the
   adapter and snapshots), --repeats rounds in turning order: the median wall time of the last step, and
   the ratios. On a loaded machine (shared cores) read the spread printed next to it.

    .venv/bin/python bench/ray_jobs.py                 # writes bench/results/ray-cpu.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from store.settings import home_id  # noqa: E402
from tests.conftest import free_port  # noqa: E402

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-lookup", "checkpoint_every": 0}
BIN = Path(sys.executable).parent
FIXED = (2.0, 1e-3, 1.0, 1e-3, 3.0, 1e-3, 1.0)
"""loss, lr, grad_norm, update_norm, param_norm, update_ratio, step_scale of a synthetic step row."""


def wait(check: Any, timeout: float = 180, poll: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, sqlite3.Error):
            value = check()
            if value:
                return value
        time.sleep(poll)
    raise TimeoutError("timed out")


def post(url: str, body: Any) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@contextlib.contextmanager
def server(home: Path, **settings: str) -> Iterator[str]:
    port = free_port()
    env = os.environ | {"STEPSCOPE_HOME": str(home)} | {f"STEPSCOPE_{k.upper()}": v for k, v in settings.items()}
    env.pop("STEPSCOPE_TOKEN", None)
    log = (home / "server.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log, stderr=log)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: urllib.request.urlopen(f"{url}/api/health", timeout=2), timeout=60, poll=0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@contextlib.contextmanager
def ray_cluster(folder: Path) -> Iterator[str]:
    dashboard, gcs, client, agent = (free_port() for _ in range(4))
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--port", str(gcs),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--disable-usage-stats", "--temp-dir", str(folder)]  # fmt: skip
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait(lambda: urllib.request.urlopen(f"{url}/api/version", timeout=2), timeout=120, poll=0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)


def first_step_seconds(url: str, db: Path) -> float:
    start = time.perf_counter()
    run_id = post(f"{url}/api/runs", TINY | {"max_steps": 5})["id"]

    def first() -> bool:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("SELECT 1 FROM step_metrics WHERE run_id = ? LIMIT 1", (run_id,)).fetchone() is not None

    wait(first)
    took = time.perf_counter() - start

    def ended() -> bool:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()[0] not in (
                "queued", "running")  # fmt: skip

    wait(ended)
    return took


def recorder_rates(url: str, db: Path, run_ids: tuple[int, int], rows: int) -> tuple[float, float]:
    from trainer.http_recorder import HttpRecorder
    from trainer.recorder import Recorder

    def feed(recorder: Any, run_id: int) -> float:
        recorder.update_run(status="running")
        start = time.perf_counter()
        for first in range(1, rows + 1, 50):
            batch = range(first, min(first + 50, rows + 1))
            recorder.steps([(s, s / 10, s * 8, s * 100, *FIXED, s * 0.1, 0.1, 0.5, -0.1, 0) for s in batch])
        recorder.close()
        took = time.perf_counter() - start
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM step_metrics WHERE run_id = ?", (run_id,)).fetchone()[0] == rows
        return rows / took

    return feed(Recorder(db, run_ids[0]), run_ids[0]), feed(HttpRecorder(url, run_ids[1]), run_ids[1])


def queued_runs(home: Path, configs: list[dict[str, Any]]) -> list[int]:
    from sqlmodel import Session

    from app.services import create_run
    from store.db import make_engine, upgrade
    from trainer.config import TrainConfig

    url = f"sqlite:///{home / 'stepscope.db'}"
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session:
        ids = [create_run(session, TrainConfig(**c)).id for c in configs]
    engine.dispose()
    return [int(i) for i in ids if i is not None]


def last_step_wall(db: Path, run_id: int) -> float:
    with sqlite3.connect(db) as conn:
        return float(conn.execute("SELECT max(wall_time) FROM step_metrics WHERE run_id = ?", (run_id,)).fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray-cpu.txt")
    args = parser.parse_args()
    # One torch thread a job: on 2 shared cores, two threads a job against the server and other users' work
    # made the same 100 steps take 3 s or 30 s from one run to the next.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    lines = [f"# bench/ray_jobs.py on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, "
             f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"]  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as tmp:
        root = Path(tmp)
        (root / "local").mkdir()
        with server(root / "local") as url:
            local = [first_step_seconds(url, root / "local" / "stepscope.db") for _ in range(args.repeats)]
        with ray_cluster(root / "cluster") as ray_url:
            (root / "ray").mkdir()
            with server(root / "ray", executor="ray", ray_address=ray_url) as url:
                ray = [first_step_seconds(url, root / "ray" / "stepscope.db") for _ in range(args.repeats)]
        lines.append(f"time to first step, local executor: median {statistics.median(local):.2f} s  {local}")
        lines.append(f"time to first step, ray executor:   median {statistics.median(ray):.2f} s  {ray}")
        lines.append(f"extra time to first step through Ray: {statistics.median(ray) - statistics.median(local):+.2f} s"
                     f"  (ratio {statistics.median(ray) / statistics.median(local):.2f})")  # fmt: skip

        # A server whose executor cannot start anything (a Ray address nobody answers): runs stay queued for
        # the trainers started by hand below, and the server only records.
        home = root / "rec"
        home.mkdir()
        pairs = args.repeats
        ids = queued_runs(home, [TINY | {"max_steps": 1}] * 2 + [TINY | {"max_steps": args.steps}] * (3 * pairs))
        db = home / "stepscope.db"
        with server(home, executor="ray", ray_address=f"http://127.0.0.1:{free_port()}") as url:
            direct, http = recorder_rates(url, db, (ids[0], ids[1]), args.rows)
            lines.append(f"recorder, {args.rows} rows: direct SQLite {direct:,.0f} rows/s, HTTP {http:,.0f} rows/s"
                         f"  (HTTP/direct throughput {http / direct:.3f})")  # fmt: skip
            shared = {"STEPSCOPE_HOME": str(home), "STEPSCOPE_SERVER_ID": home_id(home)}  # a job on the server's node
            own = shared | {"STEPSCOPE_JOB_HOME": str(root / "node")}  # a node of its own: it sends its files too
            http = ["--server", url]
            kinds = [("direct", [], shared), ("http", http, shared), ("http+files", http, own)]
            walls: dict[str, list[float]] = {kind: [] for kind, _, _ in kinds}
            whole: dict[str, list[float]] = {kind: [] for kind, _, _ in kinds}  # the process, start to exit
            for i in range(pairs):  # the order turns each round: drift hits all alike
                for j, (kind, extra, env) in enumerate(kinds[i % 3 :] + kinds[: i % 3]):
                    run_id = ids[2 + 3 * i + j]
                    started = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "trainer", "--run-id", str(run_id), *extra], cwd=REPO,
                                   env=os.environ | env, check=True, capture_output=True)  # fmt: skip
                    whole[kind].append(time.perf_counter() - started)
                    walls[kind].append(last_step_wall(db, run_id))
            d, h, f = (statistics.median(walls[kind]) for kind, _, _ in kinds)
            spread = ", ".join(f"{kind} {[round(w, 2) for w in walls[kind]]}" for kind, _, _ in kinds)
            lines.append(f"tiny run, {args.steps} steps, median of {pairs}: direct {d:.2f} s, HTTP {h:.2f} s, "
                         f"HTTP sending its files {f:.2f} s  (HTTP/direct wall time {h / d:.3f}, with files "
                         f"{f / d:.3f}; {spread})")  # fmt: skip
            d, h, f = (statistics.median(whole[kind]) for kind, _, _ in kinds)
            lines.append(f"  their processes, start to exit (loading, files sent at the end): direct {d:.2f} s, "
                         f"HTTP {h:.2f} s, with files {f:.2f} s  (ratios {h / d:.3f}, {f / d:.3f})")  # fmt: skip
    lines.append("load average (1, 5, 15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print("\n".join(lines))
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
