"""Metric storage, side by side: stepscope against MLflow (SQLite backend) and Trackio, one workload.

The workload is 10 runs x 20,000 steps x 4 metrics (loss, lr, grad_norm, update_norm). Each tool
gets the same numbers (one .npy file), already built into its own input format, and is timed on:

  ingest                 points/s through its fastest batch API (stepscope: the trainer's `Recorder`)
  one history            one run's every `loss` value
  all 40 series          all 4 metrics of all 10 runs
  ... downsampled        the same two reads with at most 1,000 points per series
  REST                   one 20,000-point series over HTTP on 127.0.0.1, and the downsampled compare

Every number is the best of 3 repetitions. MLflow and Trackio live in their own virtual environment
(bench/.venv-peers, made by scripts/bench-peers-venv.sh on first use) and run in subprocesses of it;
they are never dependencies of stepscope. Nothing leaves the machine (offline env, loopback only).

    .venv/bin/python bench/storage.py                 # the whole comparison, about 6 minutes
    .venv/bin/python bench/storage.py --peers none    # stepscope alone (quick)

It prints one table with ratios and PASS/FAIL per target, and saves it to bench/results/store.txt.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"
PEERS_SETUP = ROOT / "scripts" / "bench-peers-venv.sh"
RESULTS = ROOT / "bench" / "results" / "store.txt"

RUNS, STEPS = 10, 20_000
KEYS = ("loss", "lr", "grad_norm", "update_norm")
POINTS = RUNS * STEPS * len(KEYS)
MAX_POINTS = 1000
MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call
RECORDER_CHUNK = 1000  # rows per Recorder.steps() call (the trainer hands over 32 at a time; the writer coalesces)
PEERS = ("mlflow", "trackio")

# Keep every tool off the network: no hub, no telemetry, no analytics.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def set_steps(steps: int) -> None:
    """A smaller workload for a quick check of the bench itself (the numbers then mean little)."""
    global STEPS, POINTS
    STEPS, POINTS = steps, RUNS * steps * len(KEYS)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the workload --------------------------------------------------------------------------------------


def make_workload(seed: int = 0) -> np.ndarray:
    """(RUNS, len(KEYS), STEPS): a learning-rate sweep with noisy losses and a few spikes."""
    rng = np.random.default_rng(seed)
    steps = np.arange(1, STEPS + 1, dtype=float)
    data = np.empty((RUNS, len(KEYS), STEPS))
    for r in range(RUNS):
        peak = 1e-4 * 2.0 ** (r - RUNS // 2)
        lr = peak * np.minimum(1.0, steps / 200) * 0.5 * (1 + np.cos(np.pi * steps / STEPS))
        loss = 0.5 + 2.0 * np.exp(-steps / (3000 + 300 * r)) + 0.05 * rng.standard_normal(STEPS)
        loss[rng.integers(0, STEPS, 5)] += 5.0
        grad_norm = np.abs(1.0 + 0.3 * rng.standard_normal(STEPS))
        data[r] = loss, lr, grad_norm, lr * grad_norm * 100
    return data


def minmax_downsample(values: list[float], max_points: int) -> list[int]:
    """Client-side downsampling for tools that return everything: each bucket's min and max index."""
    n = len(values)
    if n <= max_points:
        return list(range(n))
    buckets = max(1, (max_points - 2) // 2)
    width = math.ceil(n / buckets)
    array = np.asarray(values, dtype=float)
    pad = np.full(width * math.ceil(n / width), np.nan)
    pad[:n] = array
    grid = pad.reshape(-1, width)
    starts = np.arange(grid.shape[0]) * width
    keep = np.concatenate([[0, n - 1], starts + np.nanargmin(grid, axis=1), starts + np.nanargmax(grid, axis=1)])
    return [int(i) for i in np.unique(keep)]


# --- HTTP on loopback ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_http(port: int, path: str, proc: subprocess.Popen[bytes] | None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before answering {path}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no answer from 127.0.0.1:{port}{path} after {timeout:.0f} s")


class Http:
    """One persistent loopback connection (http.client never goes through a proxy)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload else {}
        try:
            self.conn.request(method, path, body=payload, headers=headers)
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):  # the server closed an idle keep-alive
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.conn.request(method, path, body=payload, headers=headers)
            response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return json.loads(data)


def start_server(
    command: list[str], env: dict[str, str], port: int, ready_path: str, cwd: Path
) -> subprocess.Popen[bytes]:
    """A server subprocess in its own session, answering on `ready_path`; its output goes to cwd/server.log."""
    with (cwd / "server.log").open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(port, ready_path, proc)
        settle(proc.pid)
    except BaseException:
        stop_server(proc)
        raise
    return proc


def session_cpu_seconds(session: int) -> float:
    """CPU time used so far by the processes of a session (a server started with start_new_session)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == session:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def settle(session: int, timeout: float = 60.0) -> None:
    """Wait until a server is idle (under 5% of a CPU for a second): start-up work that goes on after it
    answers (`stepscope serve` imports torch in the background for its first training job) is not the
    cost of a request. No-op without /proc."""
    if not Path("/proc/self/stat").exists():
        return
    deadline = time.monotonic() + timeout
    used = session_cpu_seconds(session)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        before, used = used, session_cpu_seconds(session)
        if used - before < 0.05:
            return
    log(f"server session {session} still busy after {timeout:.0f} s; timing it anyway")


def stop_server(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- the tools ---------------------------------------------------------------------------------------------------
#
# Each tool answers the same calls, so the driver can take turns between them: every repetition of a
# measurement runs for each tool back to back, and a busy spell on the machine hits them all alike.
#   ingest(rep) -> [seconds, points]     write (part of) the workload into a fresh store
#   open_reads() -> {extra numbers}      the store read from now on holds the whole workload
#   read(name) -> {variant: [seconds, points]}, for name in READS (and REST after start_rest)

Timed = dict[str, list[float]]
READS = ("one", "all", "one_ds", "all_ds")
REST = ("rest_one", "rest_all_ds")


def timed(fn: Callable[[], int]) -> list[float]:
    start = time.perf_counter()
    points = fn()
    return [time.perf_counter() - start, points]


def step_rows(data: np.ndarray, run: int) -> list[tuple[Any, ...]]:
    """The trainer's rows (step, *STEP_COLUMNS) for one run; every column filled as the real loop does."""
    loss, lr, grad_norm, update_norm = (data[run, k].tolist() for k in range(len(KEYS)))
    return [
        (s + 1, (s + 1) / 1000, (s + 1) * 8, (s + 1) * 1024, loss[s], lr[s], grad_norm[s], update_norm[s],
         30.0, update_norm[s] / 30.0, 1.0, 1.7e9 + s * 0.05, 0.05, 0.9, -0.05, 0)
        for s in range(STEPS)
    ]  # fmt: skip


class Stepscope:
    """Writes through the trainer's Recorder; reads through store.metrics and a real `stepscope serve`."""

    def __init__(self, work: Path, data: np.ndarray) -> None:
        self.work, self.data = work, data
        self.rows = [step_rows(data, r) for r in range(RUNS)]
        self.ids: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def ingest(self, rep: int) -> list[float]:
        """A fresh database; the runs are inserted first (not timed), then every row through Recorder."""
        from store.db import upgrade
        from store.tables import RunStatus
        from trainer.config import make_config
        from trainer.recorder import Recorder, new_run

        self.home = self.work / f"home-{rep}"
        db = self.home / "stepscope.db"
        url = f"sqlite:///{db}"
        upgrade(url)
        self.ids = []
        for r in range(RUNS):
            lr = float(self.data[r, 1].max())
            self.ids.append(
                new_run(url, make_config({"model": "tiny-random-llama", "name": f"run-{r}", "learning_rate": lr}))
            )
        start = time.perf_counter()
        for run_id, rows in zip(self.ids, self.rows, strict=True):
            recorder = Recorder(db, run_id)
            for i in range(0, STEPS, RECORDER_CHUNK):
                recorder.steps(rows[i : i + RECORDER_CHUNK])
            recorder.update_run(status=RunStatus.completed, steps_done=STEPS, last_loss=rows[-1][4])
            recorder.close()
        return [time.perf_counter() - start, POINTS]

    def open_reads(self) -> dict[str, float]:
        import sqlite3

        from store.db import configure_sqlite

        self.conn = sqlite3.connect(self.home / "stepscope.db", check_same_thread=False)
        configure_sqlite(self.conn)
        return {}

    def _args(self, name: str) -> tuple[list[int], list[str], int | None]:
        ids = self.ids if name.startswith("all") else self.ids[:1]
        keys = list(KEYS) if name.startswith("all") else ["loss"]
        return ids, keys, MAX_POINTS if name.endswith("_ds") else None

    def read(self, name: str) -> Timed:
        from store.metrics import compare_json, metrics_json, read_metrics

        if name in REST:
            return {"": timed(lambda: self._rest(name))}
        ids, keys, max_points = self._args(name)

        def as_json() -> int:
            if len(ids) == 1:
                body = json.loads(metrics_json(self.conn, ids[0], keys, None, max_points))
                return sum(len(v) for v in body["series"].values())
            body = json.loads(compare_json(self.conn, ids, keys, max_points))
            return sum(len(v) for run in body["runs"] for v in run["series"].values())

        def as_lists() -> int:
            return sum(len(read_metrics(self.conn, i, keys, None, max_points).steps) * len(keys) for i in ids)

        # The JSON text is what the API sends: timed without parsing it here (the points come from a parse).
        if len(ids) == 1:
            seconds = timed(lambda: len(metrics_json(self.conn, ids[0], keys, None, max_points)))[0]
        else:
            seconds = timed(lambda: len(compare_json(self.conn, ids, keys, max_points)))[0]
        return {"json": [seconds, as_json()], "lists": timed(as_lists)}

    def start_rest(self) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEPSCOPE_")} | OFFLINE_ENV
        env |= {"STEPSCOPE_HOME": str(self.home), "STEPSCOPE_HOST": "127.0.0.1", "STEPSCOPE_PORT": str(self.port),
                "STEPSCOPE_MAX_CONCURRENT_RUNS": "1"}  # fmt: skip
        # Every run is completed, so the job runner has nothing to start.
        self.proc = start_server([sys.executable, "-m", "app.cli", "serve"], env, self.port, "/api/health", self.home)
        self.http = Http(self.port)
        for name in REST:
            self._rest(name)  # warm-up, not timed (every tool gets one)

    def _rest(self, name: str) -> int:
        if name == "rest_one":
            return len(self.http.call("GET", f"/api/runs/{self.ids[0]}/metrics?keys=loss")["series"]["loss"])
        path = f"/api/compare?ids={','.join(map(str, self.ids))}&keys={','.join(KEYS)}&max_points={MAX_POINTS}"
        return sum(len(v) for run in self.http.call("GET", path)["runs"] for v in run["series"].values())

    def close(self) -> None:
        stop_server(self.proc)


class Mlflow:
    """MlflowClient on a sqlite:/// store; REST through `mlflow server`. Runs in the peers' environment."""

    def __init__(self, work: Path, data: np.ndarray) -> None:
        from mlflow.tracking import MlflowClient

        self.work, self.data = work, data
        self.uri = f"sqlite:///{work / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = self.client.create_experiment("bench", artifact_location=(work / "artifacts").as_uri())
        self.store = self.client._tracking_client.store  # the server-side sampling MLflow's UI uses lives here
        self.run_ids: list[str] = []
        self.first: list[float] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def _ingest_run(self, r: int) -> list[float]:
        from mlflow.entities import Metric

        run_id = self.client.create_run(self.experiment, run_name=f"run-{r}").info.run_id
        values = self.data[r].tolist()
        metrics = [Metric(key, values[k][s], 1_700_000_000_000 + s, s + 1) for s in range(STEPS)
                   for k, key in enumerate(KEYS)]  # fmt: skip
        start = time.perf_counter()
        for i in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + MLFLOW_BATCH])
        self.run_ids.append(run_id)
        return [time.perf_counter() - start, len(metrics)]

    def ingest(self, rep: int) -> list[float]:
        """One run (80,000 points) per repetition, into the store the reads use: 800k points take minutes."""
        self.first.append(self._ingest_run(rep)[0])
        return [self.first[-1], STEPS * len(KEYS)]

    def open_reads(self) -> dict[str, Any]:
        import mlflow

        rest = [self._ingest_run(r)[0] for r in range(len(self.run_ids), RUNS)]
        return {
            "ingest_all_runs": STEPS * len(KEYS) * RUNS / (sum(self.first) + sum(rest)),
            "version": mlflow.__version__,
        }

    def _history(self, ids: list[str], keys: tuple[str, ...], max_points: int | None) -> int:
        points = 0
        for run_id in ids:
            for key in keys:
                values = [m.value for m in self.client.get_metric_history(run_id, key)]
                points += len(minmax_downsample(values, max_points)) if max_points else len(values)
        return points

    def _sampled(self, ids: list[str], keys: tuple[str, ...]) -> int:
        return sum(len(self.store.get_metric_history_bulk_interval(ids, k, MAX_POINTS, None, None)) for k in keys)

    def read(self, name: str) -> Timed:
        if name in REST:
            return {"": timed(lambda: self._rest(name))}
        ids = self.run_ids if name.startswith("all") else self.run_ids[:1]
        keys = KEYS if name.startswith("all") else ("loss",)
        if not name.endswith("_ds"):
            return {"": timed(lambda: self._history(ids, keys, None))}
        out = {"": timed(lambda: self._sampled(ids, keys))}
        if name == "one_ds":  # what a dashboard without server-side sampling would have to do
            out["client"] = timed(lambda: self._history(ids, keys, MAX_POINTS))
        return out

    def start_rest(self) -> None:
        self.port = free_port()
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.uri,
                   "--default-artifact-root", (self.work / "artifacts").as_uri(), "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"]  # fmt: skip
        self.proc = start_server(command, dict(os.environ), self.port, "/health", self.work)
        self.http = Http(self.port)
        for name in REST:
            self._rest(name)

    def _rest(self, name: str) -> int:
        if name == "rest_one":
            path = f"/api/2.0/mlflow/metrics/get-history?run_id={self.run_ids[0]}&metric_key=loss"
            return len(self.http.call("GET", path)["metrics"])
        runs = "&".join(f"run_ids={i}" for i in self.run_ids)
        path = "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval?{}&metric_key={}&max_results={}"
        return sum(len(self.http.call("GET", path.format(runs, k, MAX_POINTS))["metrics"]) for k in KEYS)

    def close(self) -> None:
        stop_server(self.proc)


class Trackio:
    """Trackio's SQLiteStorage (local only); REST through its own Starlette API server. Peers' environment."""

    def __init__(self, work: Path, data: np.ndarray) -> None:
        self.logs = [
            [dict(zip(KEYS, v, strict=True)) for v in zip(*data[r].tolist(), strict=True)] for r in range(RUNS)
        ]
        self.runs = [f"run-{r}" for r in range(RUNS)]
        self.server: Any = None

    def ingest(self, rep: int) -> list[float]:
        from trackio.sqlite_storage import SQLiteStorage

        self.project = f"bench-{rep}"
        steps = list(range(1, STEPS + 1))
        start = time.perf_counter()
        for run, logs in zip(self.runs, self.logs, strict=True):  # its fastest path: one call per run
            SQLiteStorage.bulk_log(self.project, run, logs, steps=steps)
        return [time.perf_counter() - start, POINTS]

    def open_reads(self) -> dict[str, Any]:
        import trackio

        return {"version": trackio.__version__}

    def read(self, name: str) -> Timed:
        from trackio.sqlite_storage import SQLiteStorage

        if name in REST:
            return {"": timed(lambda: self._rest(name))}
        max_points = MAX_POINTS if name.endswith("_ds") else None
        if name.startswith("one"):

            def values() -> int:
                return len(SQLiteStorage.get_metric_values(self.project, self.runs[0], "loss", max_points=max_points))

            return {"": timed(values)}

        def every() -> int:
            batch = SQLiteStorage.get_logs_batch(self.project, [{"run": r} for r in self.runs], max_points=max_points)
            return sum(sum(key in row for key in KEYS) for entry in batch for row in entry["logs"])

        return {"": timed(every)}

    def start_rest(self) -> None:
        import threading

        import uvicorn
        from trackio.server import build_starlette_app_only

        self.port = free_port()
        app, _ = build_starlette_app_only()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for_http(self.port, "/version", None)
        self.http = Http(self.port)
        for name in REST:
            self._rest(name)

    def _rest(self, name: str) -> int:
        if name == "rest_one":
            body = {"project": self.project, "run": self.runs[0], "metric_name": "loss"}
            return len(self.http.call("POST", "/api/get_metric_values", body)["data"])
        body = {"project": self.project, "runs": [{"run": r} for r in self.runs], "max_points": MAX_POINTS}
        data = self.http.call("POST", "/api/get_logs_batch", body)["data"]
        return sum(sum(key in row for key in KEYS) for entry in data for row in entry["logs"])

    def close(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(15)


TOOLS = {"mlflow": Mlflow, "trackio": Trackio}


def peer_main(name: str, work: Path) -> None:
    """Inside the peers' environment: answer the driver's calls, one JSON line each way."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # the libraries' own prints must not mix with the answers
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    tool = TOOLS[name](work, np.load(work.parent / "workload.npy"))
    protocol.write("{}\n")
    for line in sys.stdin:
        op, args = json.loads(line)
        try:
            answer = {"ok": getattr(tool, op)(*args)}
        except Exception:
            answer = {"error": traceback.format_exc()}
        protocol.write(json.dumps(answer) + "\n")
        if op == "close":
            return


class Peer:
    """The driver's handle on a tool running in a subprocess of the peers' environment."""

    def __init__(self, name: str, tmp: Path) -> None:
        work = tmp / name
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACKIO_"))} | OFFLINE_ENV
        env |= {"TRACKIO_DIR": str(work / "trackio"), "HF_HOME": str(work / "hf"), "PYTHONPATH": ""}
        command = [str(PEERS_PYTHON), str(Path(__file__).resolve()), "--peer", name, "--work", str(work),
                   "--steps", str(STEPS)]  # fmt: skip
        self.proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._answer(name)

    def _answer(self, what: str) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer process exited during {what} (code {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{what} failed in the peer process:\n{answer['error']}")
        return answer.get("ok")

    def __getattr__(self, op: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps([op, list(args)]) + "\n")
            self.proc.stdin.flush()
            return self._answer(op)

        return call

    def close(self) -> None:
        try:
            self.__getattr__("close")()
        finally:
            self.proc.wait(30)


def ensure_peers_venv() -> None:
    check = [str(PEERS_PYTHON), "-c", "import mlflow, trackio"]
    if PEERS_PYTHON.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return
    log(f"creating the peers' environment with {PEERS_SETUP.relative_to(ROOT)} (once; a few minutes)")
    subprocess.run(["bash", str(PEERS_SETUP)], check=True)


def measure(tools: dict[str, Any], repeats: int) -> dict[str, dict[str, Any]]:
    """Every measurement `repeats` times, the tools taking turns; the best time of each is kept."""
    results: dict[str, dict[str, Any]] = {name: {} for name in tools}

    def keep(name: str, key: str, seconds: float, points: float) -> None:
        if seconds < results[name].get(key, math.inf):
            results[name][key] = seconds
        results[name][f"{key}_points"] = points

    for rep in range(repeats):
        for name, tool in tools.items():
            seconds, points = tool.ingest(rep)
            results[name]["ingest"] = max(results[name].get("ingest", 0.0), points / seconds)
            log(f"{name} ingest {rep + 1}/{repeats}: {points / seconds:,.0f} points/s")
    for name, tool in tools.items():
        results[name].update(tool.open_reads())
    for stage in (READS, REST):
        if stage is REST:
            for tool in tools.values():
                tool.start_rest()
        for rep in range(repeats):
            for read in stage:
                for name, tool in tools.items():
                    for variant, (seconds, points) in tool.read(read).items():
                        keep(name, f"{read}_{variant}" if variant else read, seconds, points)
            log(f"reads {', '.join(stage)}: repetition {rep + 1}/{repeats} done")
    return results


# --- the table --------------------------------------------------------------------------------------------------


def rows() -> list[tuple[str, str, str]]:
    """(key, label, unit) of the table's rows."""
    n, total = f"{STEPS:,}", f"{POINTS:,}"
    return [
        ("ingest", f"ingest, {total} points (points/s)", "rate"),
        ("one", f"one history: 1 run x loss, {n} points", "ms"),
        ("all", f"all 40 series: 10 runs x 4 metrics, {total}", "ms"),
        ("one_ds", f"one history, <= {MAX_POINTS:,} points", "ms"),
        ("all_ds", f"40 series, <= {MAX_POINTS:,} points each", "ms"),
        ("rest_one", f"REST: one {n}-point series", "ms"),
        ("rest_all_ds", f"REST: 40 series, <= {MAX_POINTS:,} points each", "ms"),
    ]


def cell(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if unit == "rate" else f"{value * 1e3:,.1f}"


def ratio(mine: float | None, peers: list[float], unit: str) -> float | None:
    """How many times better than the best peer (higher rate, or shorter time)."""
    if mine is None or not peers:
        return None
    return mine / max(peers) if unit == "rate" else min(peers) / mine


def stepscope_paths(result: dict[str, Any], key: str) -> tuple[float, float | None]:
    """(the API's path: JSON text, or the only number; Python lists where measured)."""
    if f"{key}_json" in result:
        return float(result[f"{key}_json"]), float(result[f"{key}_lists"])
    return float(result[key]), None


def report(results: dict[str, dict[str, Any]], repeats: int) -> tuple[str, dict[str, float | None]]:
    """The table and notes; the ratios (API path) by row key."""
    peers = [p for p in PEERS if p in results]
    head = ["measurement", *peers, "stepscope", "(lists)", "x best peer", "(lists)"]
    lines, ratios = [], {}
    for key, label, unit in rows():
        values = [float(results[p][key]) for p in peers if key in results[p]]
        api, lists = stepscope_paths(results["stepscope"], key)
        ratios[key] = ratio(api, values, unit)
        x_lists = ratio(lists, values, unit)
        shown = [cell(results[p].get(key), unit) for p in peers] + [cell(api, unit), cell(lists, unit)]
        shown += ["-" if x is None else f"{x:,.1f}x" for x in (ratios[key], x_lists)]
        lines.append([label, *shown])
    widths = [max(len(str(row[i])) for row in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*row) for row in lines)]
    out.append("")
    out.append(f"Times in ms, best of {repeats} (ingest in points/s). stepscope's reads go through store.metrics:")
    out.append("  stepscope  metrics_json / compare_json: the JSON text the API sends (SQLite writes the arrays);")
    out.append("  (lists)    read_metrics per run: Python lists, like the peers' Python objects.")
    out += notes(results)
    return "\n".join(out), ratios


def notes(results: dict[str, dict[str, Any]]) -> list[str]:
    how = {
        "stepscope": (
            f"ingest: trainer.recorder.Recorder, one per run, {RECORDER_CHUNK} rows per steps() call, into a fresh "
            "database (12 columns a row, counted as 4 points). REST: `python -m app.cli serve` (stepscope serve) "
            "as a subprocess; GET /api/runs/{{id}}/metrics?keys=loss and GET /api/compare?max_points=1000."
        ),
        "mlflow": (
            f"ingest: MlflowClient.log_batch, {MLFLOW_BATCH} metrics a call (its limit), sqlite:/// store; each run "
            "(80k points) timed alone while all 10 go in, best of the first 3 runs (all 10 runs: {all_runs} "
            "points/s). Reads: get_metric_history per series; downsampled rows: the store's "
            "get_metric_history_bulk_interval (even sampling in SQL, what MLflow's UI uses; reading the full "
            "history and keeping min/max client-side instead takes {client_ds} ms for one series). REST: `mlflow "
            "server`; get-history, and ajax-api get-history-bulk-interval once per key."
        ),
        "trackio": (
            "ingest: SQLiteStorage.bulk_log, one call per run with all 20k steps. Reads: get_metric_values (one "
            "series), get_logs_batch (all runs); max_points=1000 for the downsampled rows (an even stride: spikes "
            "can be dropped). REST: its own Starlette API server; POST /api/get_metric_values and "
            "/api/get_logs_batch."
        ),
    }
    lines = ["", "How each tool was driven:"]
    for name, result in results.items():
        text = how[name].format(
            all_runs=f"{result.get('ingest_all_runs', 0):,.0f}",
            client_ds=f"{result.get('one_ds_client', 0) * 1e3:,.0f}",
        )
        lines.append(textwrap.fill(text, 110, initial_indent=f"  {name:<10} ", subsequent_indent=" " * 13))
        if "version" in result:
            lines.append(f"{'':13}version {result['version']}")
        counts = ", ".join(
            f"{key} {result.get(f'{key}_json_points', result.get(f'{key}_points'))}" for key, _, _ in rows()[1:]
        )
        lines.append(f"{'':13}points returned: {counts}")
    return lines


def verdicts(results: dict[str, dict[str, Any]], ratios: dict[str, float | None]) -> list[str]:
    s = results["stepscope"]
    lines = ["Targets (judged on the API's path; the Python-lists path in brackets):"]
    if "trackio" in results:
        x = s["ingest"] / results["trackio"]["ingest"]
        lines.append(f"  {'PASS' if x >= 5 else 'FAIL'}  ingest >= 5x Trackio's: {x:.1f}x")
    for key, label, unit in rows()[1:]:
        x = ratios.get(key)
        if x is None:
            continue
        lists = stepscope_paths(s, key)[1]
        peers = [float(results[p][key]) for p in PEERS if p in results and key in results[p]]
        extra = "" if lists is None else f" [{ratio(lists, peers, unit):,.1f}x]"
        lines.append(f"  {'PASS' if x >= 5 else 'FAIL'}  {label} >= 5x faster than the fastest peer: {x:,.1f}x{extra}")
    api, lists = stepscope_paths(s, "all_ds")
    lines.append(f"  {'PASS' if api <= 0.05 else 'FAIL'}  downsampled 10-run compare <= 50 ms: {api * 1e3:.1f} ms "
                 f"[{(lists or 0) * 1e3:.1f} ms]; over REST {s['rest_all_ds'] * 1e3:.1f} ms")  # fmt: skip
    return lines


def code_version() -> str:
    """The commit measured, and whether the read/write code differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        files = ["app/metrics.py", "app/routers/metrics.py", "trainer/recorder.py", "app/db.py", "app/models.py"]
        dirty = subprocess.run(["git", "status", "--porcelain", *files], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "stepscope (no git)"
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    return f"stepscope at {commit.stdout.strip()}" + (
        f" with uncommitted changes to {', '.join(changed)}" if changed else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers to run, or 'none'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to save the printed report")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per run (smaller: a quick check of the bench)")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)  # internal: inside the peers' venv
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_steps(args.steps)
    if args.peer:
        peer_main(args.peer, args.work)
        return

    try:
        import store.metrics  # noqa: F401
    except ImportError:  # started with a python that lacks stepscope: use the project's environment
        venv = ROOT / ".venv" / "bin" / "python"
        os.execv(venv, [str(venv), *sys.argv])
    peers = [] if args.peers == "none" else [p for p in args.peers.split(",") if p]
    if peers:
        ensure_peers_venv()
    tmp = Path(tempfile.mkdtemp(prefix="stepscope-store-bench-"))
    tools: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        data = make_workload()
        np.save(tmp / "workload.npy", data)
        tools["stepscope"] = Stepscope(tmp / "stepscope", data)
        for name in peers:
            tools[name] = Peer(name, tmp)
        results = measure(tools, args.repeats)
    finally:
        for tool in tools.values():
            tool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    table, ratios = report(results, args.repeats)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    seconds = time.perf_counter() - started
    footer = (
        f"Workload {RUNS} runs x {STEPS:,} steps x {len(KEYS)} metrics; whole bench {seconds:.0f} s on "
        f"{os.cpu_count()} CPUs (load average at the end: {load}), Python {sys.version.split()[0]}; {code_version()}."
    )
    text = "\n".join([table, "", *verdicts(results, ratios), "", footer])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
