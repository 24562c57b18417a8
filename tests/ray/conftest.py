"""A real one-node Ray cluster for the Ray tests (`ray start --head`, two CPUs, free ports, a temporary folder),
stopped at the end. Its jobs find the virtual environment's `python` first on their PATH."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.conftest import REPO, Server, wait_until_up
from tests.conftest import free_port, wait_for


@pytest.fixture(scope="module")  # stopped after its tests: the later ones get both cores
def ray_address() -> Iterator[str]:
    pytest.importorskip("ray.job_submission", reason='the ray extra is not installed (pip install -e ".[ray]")')
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short (< 108 bytes)
    tempfile_dir = str(temp)
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    dashboard = free_port()
    ports = [free_port() for _ in range(3)]
    start = [
        str(bin_dir / "ray"), "start", "--head", "--num-cpus", "2", "--num-gpus", "0",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--port", str(ports[0]),
        "--ray-client-server-port", str(ports[1]), "--dashboard-agent-listen-port", str(ports[2]),
        "--disable-usage-stats", "--temp-dir", tempfile_dir,
    ]  # fmt: skip
    # --block: `ray start` stays in the foreground as the cluster's parent, in a session of its own, so the
    # cluster is stopped by that process group alone (`ray stop` would stop every Ray cluster of this user).
    log = (temp / "ray-start.log").open("wb")
    head = subprocess.Popen([*start, "--block"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for(lambda: _answers(url) or head.poll() is not None, timeout=120, what="the Ray dashboard")
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited: {(temp / 'ray-start.log').read_text()[-3000:]}")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            head.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # workers it left behind, in the same process group
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def serve_on(home: Path, port: int, **settings: str) -> Iterator[Server]:
    """`stepscope serve` on this port (a restarted server must answer where its jobs send their rows)."""
    env = os.environ | {"STEPSCOPE_HOME": str(home)} | {f"STEPSCOPE_{k.upper()}": v for k, v in settings.items()}
    for name in ("DATABASE_URL", "TOKEN", "ALLOWED_HOSTS"):
        env.pop(f"STEPSCOPE_{name}", None)
    log = (home / "server.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield Server(home, url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
