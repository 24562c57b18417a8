"""Shared fixtures and helpers: every test gets its own STEPSCOPE_HOME (database, run folders, caches)."""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from store.db import configure_sqlite, upgrade
from store.rollups import STEP_INSERT, write_steps


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh data directory, exported so that subprocesses (training jobs) use it too.

    Starlette's TestClient addresses every request to the host 'testserver', which the server's Host
    allow-list refuses unless it is named: every Settings() a test makes allows it through the environment.
    """
    monkeypatch.setenv("STEPSCOPE_HOME", str(tmp_path))
    monkeypatch.setenv("STEPSCOPE_ALLOWED_HOSTS", "testserver")
    monkeypatch.delenv("STEPSCOPE_DATABASE_URL", raising=False)
    monkeypatch.delenv("STEPSCOPE_MODELS_DIR", raising=False)
    yield tmp_path


@pytest.fixture
def settings(home: Path) -> Settings:
    """Settings for the temporary home, with the database already migrated."""
    s = Settings()
    upgrade(s.database_url)
    return s


@pytest.fixture
def db(settings: Settings) -> Iterator[sqlite3.Connection]:
    """A raw connection to the test's migrated database, in autocommit mode, for writing rows directly."""
    conn = sqlite3.connect(settings.db_path, isolation_level=None)
    configure_sqlite(conn)
    yield conn
    conn.close()


def step_row(run_id: int, step: int, loss: float | None, lr: float = 1e-3) -> tuple[Any, ...]:
    """A step row as the recorder writes it: (run_id, step, *STEP_COLUMNS), fixed values besides loss and lr."""
    # epoch, samples, tokens, loss, lr, grad_norm, update_norm, param_norm, update_ratio, step_scale, wall, step_time,
    # update_cos, grad_alignment, skipped
    return (run_id, step, step / 10, step * 8, step * 100, loss, lr, 2.0, 2 * lr, 3.0, 1e-3, 1.0, step * 0.1, 0.1,
            0.5, -0.1, 0)  # fmt: skip


def add_steps(
    db: sqlite3.Connection,
    run_id: int,
    losses: Sequence[float | None],
    lrs: Sequence[float] | float = 1e-3,
    first: int = 1,
    rollups: bool = True,
) -> None:
    """Step rows for `losses` from step `first` on, with their rollups as the recorder writes them (or, if
    not `rollups`, by a plain INSERT), on an autocommit connection."""
    rates = [lrs] * len(losses) if isinstance(lrs, float | int) else list(lrs)
    rows = [step_row(run_id, first + i, v, lr) for i, (v, lr) in enumerate(zip(losses, rates, strict=True))]
    db.execute("BEGIN")
    if rollups:
        write_steps(db, run_id, rows)
    else:
        db.executemany(STEP_INSERT, rows)
    db.execute("COMMIT")


def wait_for(check: Callable[[], Any], timeout: float = 90.0, what: str = "condition", retry_on: tuple = ()) -> Any:
    """Poll `check` every 0.1 s until it returns something true (an exception in `retry_on` counts as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except retry_on:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def until_done(client: Any, url: str, timeout: float = 180.0) -> dict[str, Any]:
    """GET `url` (a background job's state: a loss map, a merge) until its `status` is completed or failed."""

    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(url).json()
        return body if body["status"] in ("completed", "failed") else None

    result: dict[str, Any] = wait_for(done, timeout, what=f"{url} to finish")
    return result


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the browser, for the UI tests (tests/browser, and the Ray run page in tests/ray) --------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def playwright() -> Iterator[Any]:
    """One Playwright for the session: its sync API runs an event loop in this thread, so a second one
    started while the first is open fails ("Sync API inside the asyncio loop")."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); no browser is downloaded")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(playwright: Any) -> Iterator[Any]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield browser
    browser.close()
