"""A real stepscope server (subprocess, temporary home) and Debian's headless Chromium driven by Playwright.

Never a downloaded browser: the tests use /usr/bin/chromium (scripts/test.sh installs it with apt) and
are skipped with a message when it is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.browser


class Server:
    def __init__(self, home: Path, url: str, process: subprocess.Popen[bytes]) -> None:
        self.home, self.url, self.process = home, url, process

    @property
    def db(self) -> Path:
        return self.home / "stepscope.db"


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the server did not answer at {url} within {timeout} s")


@contextlib.contextmanager
def serve(home: Path, port: int | None = None, **settings: str) -> Iterator[Server]:
    """`stepscope serve` on a loopback port (a free one unless given: a restarted server must answer where its
    jobs send their rows) with `home` as its data directory and the given STEPSCOPE_ settings (e.g.
    TOKEN="s3cret"); stopped (SIGTERM, then SIGKILL) on leaving."""
    port = port or free_port()
    env = os.environ | {"STEPSCOPE_HOME": str(home)} | {f"STEPSCOPE_{k.upper()}": v for k, v in settings.items()}
    for name in ("DATABASE_URL", "TOKEN", "ALLOWED_HOSTS"):
        if name.lower() not in settings:
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


def api(server: Server, path: str, body: dict[str, Any] | None = None) -> Any:
    """A JSON request to the server's API, as a script would send it (a POST when `body` is given)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{server.url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`stepscope serve` on a free port with its own home; three jobs may train at once (a sweep's three)."""
    with serve(tmp_path_factory.mktemp("stepscope-home"), max_concurrent_runs="3") as running:
        yield running


class Page:
    """A Playwright page that records console errors, uncaught exceptions and alert dialogs."""

    def __init__(self, page: Any, base: str, test_name: str) -> None:
        self.page, self.base, self.test_name = page, base, test_name
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def goto(self, path: str) -> None:
        self.page.goto(self.base + path)

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
def page(browser: Any, server: Server, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context per test; the test fails if any page logged an error or opened a dialog."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    wrapped = Page(context.new_page(), server.url, request.node.name)
    yield wrapped
    context.close()
    assert wrapped.errors == [], "console errors"
    assert wrapped.dialogs == [], "dialogs opened"
