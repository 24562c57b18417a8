"""Real Ray clusters for the Ray tests (`ray start --head`, free ports, a temporary folder; more nodes with
`ray_node`), stopped at the end, and helpers to follow a run and its jobs. The jobs find the virtual
environment's `python` first on their PATH."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import Server, page  # noqa: F401 (`page`: a fixture, for the Ray run page's test)
from tests.conftest import free_port, wait_for

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")  # stopped after its tests: the later ones get both cores
def ray_address() -> Iterator[str]:
    with ray_cluster(cpus=2) as (url, _, _):
        yield url


@contextlib.contextmanager
def ray_cluster(cpus: int) -> Iterator[tuple[str, str, Path]]:
    """A Ray head with `cpus` CPUs and no GPU on free loopback ports: (its dashboard URL, its GCS address for
    more nodes, its temporary folder)."""
    pytest.importorskip("ray.job_submission", reason='the ray extra is not installed (pip install -e ".[ray]")')
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short (< 108 bytes)
    dashboard, gcs, client, agent = (free_port() for _ in range(4))
    head = [
        "--head", "--num-cpus", str(cpus), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--port", str(gcs), "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        with ray_node(head, temp, "head"):
            wait_for(lambda: _answers(url), timeout=120, what="the Ray dashboard")  # the Jobs API
            yield url, f"127.0.0.1:{gcs}", temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def ray_node(
    args: list[str], temp: Path, name: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`ray start ARGS --block`: it stays in the foreground as its node's parent, in a session of its own, so
    the node is stopped by that process group alone (`ray stop` would stop every Ray cluster of this user).
    Ready once `ray start` says the node runs. `env`: more of the node's environment (its jobs inherit it)."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | {"PATH": path, "RAY_USAGE_STATS_ENABLED": "0"} | (env or {})
    common = ["--num-gpus", "0", "--disable-usage-stats", "--temp-dir", str(temp), "--block"]
    log_path = temp / f"ray-{name}.log"
    log = log_path.open("wb")
    node = subprocess.Popen(
        [str(BIN / "ray"), "start", *args, *common], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    started = "Ray runtime started"
    try:
        wait_for(lambda: started in log_path.read_text() or node.poll() is not None, timeout=120, what=f"Ray {name}")
        if node.poll() is not None:
            raise RuntimeError(f"ray start exited: {log_path.read_text()[-3000:]}")
        yield node
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=5)
        except subprocess.TimeoutExpired:
            node.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)  # workers it left behind, in the same process group
        log.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            return True
    except OSError:
        return False


def call(server: Server, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def run(server: Server, run_id: int) -> dict[str, Any]:
    status, body = call(server, "GET", f"/api/runs/{run_id}")
    assert status == 200, body
    return dict(body)


def steps(db: Path, run_id: int) -> list[int]:
    with sqlite3.connect(db, timeout=30) as conn:
        return [r[0] for r in conn.execute("SELECT step FROM step_metrics WHERE run_id = ? ORDER BY step", (run_id,))]


def pid_of(db: Path, run_id: int) -> int | None:
    with sqlite3.connect(db, timeout=30) as conn:
        pid: int | None = conn.execute("SELECT pid FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
        return pid


def ray_jobs(server: Server, ray_address: str, run_id: int) -> list[Any]:
    """The run's jobs on the cluster (the cluster is shared by the tests: each server's run 1 is another run)."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_address).list_jobs()
    return [j for j in jobs if j.entrypoint.endswith(f"--run-id {run_id} --server {server.url}")]


def finished_job(server: Server, ray_address: str, run_id: int) -> Any:
    """The run's only Ray job, once it ended (its process exits a moment after the run records its end)."""

    def one_ended() -> Any:
        (job,) = ray_jobs(server, ray_address, run_id)
        return job if job.status.is_terminal() else None

    return wait_for(one_ended, timeout=60, what=f"run {run_id}'s Ray job to end")


def ended(server: Server, run_id: int, timeout: float = 150) -> dict[str, Any]:
    return wait_for(
        lambda: (r := run(server, run_id))["status"] not in ("queued", "running") and r,
        timeout=timeout,
        what=f"run {run_id} to end",
    )
