"""The run page's log section in headless Chromium: a real tiny-model job's log, shown when opened."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import api

if TYPE_CHECKING:
    from tests.browser.conftest import Page, Server

pytestmark = pytest.mark.browser

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic", "max_steps": 20, "name": "with a log"}


def test_the_log_section_shows_the_job_s_log_when_opened(page: Page, server: Server) -> None:
    run_id = api(server, "/api/runs", TINY)["id"]
    deadline = time.monotonic() + 150
    while api(server, f"/api/runs/{run_id}")["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.5)
    assert api(server, f"/api/runs/{run_id}")["status"] == "completed"
    p = page.page
    page.goto(f"/runs/{run_id}")
    assert not p.is_visible("#job-log-lines")  # closed: nothing read until a person asks
    assert p.get_attribute("#job-log", "data-loaded") is None
    p.click("#job-log summary")
    p.wait_for_selector("#job-log[data-loaded='true']")
    shown = p.text_content("#job-log-lines") or ""
    assert shown.splitlines() == api(server, f"/api/runs/{run_id}/logs")["lines"]
    assert "training examples" in shown and p.is_visible("#job-log-lines")
    assert p.text_content("#job-log-note") == f"(last {len(shown.splitlines())} lines, local job)"
    page.screenshot("run-page-log")
