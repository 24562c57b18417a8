"""Issue 14 in the browser: a finished run's page merges its adapter into the base model and offers the download."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.conftest import api
from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.browser.conftest import Page, Server

pytestmark = pytest.mark.browser


def test_the_merge_button_ends_in_a_download_link(page: Page, server: Server) -> None:
    run = api(server, "/api/runs", {"model": "tiny-random-llama", "max_steps": 6, "eval_every": 0,
                                    "probe_every": 0, "map_snapshots": 0})  # fmt: skip
    wait_for(lambda: api(server, f"/api/runs/{run['id']}")["status"] == "completed", timeout=120, what="the run")

    p = page.page
    page.goto(f"/runs/{run['id']}")
    assert p.get_attribute("#adapter-download", "href") == f"/api/runs/{run['id']}/adapter.zip"
    assert p.is_hidden("#merge-download")
    p.click("#merge-button")
    p.wait_for_selector("#merge-section[data-status=completed]", timeout=120_000)
    link = p.wait_for_selector("#merge-download", state="visible")
    assert link is not None and link.get_attribute("href") == f"/api/runs/{run['id']}/merged.zip"
    assert p.is_hidden("#merge-button") and p.is_hidden("#merge-progress")
    assert p.text_content("#merge-status").startswith("Merged into tiny-random-llama (float32, ")
    page.screenshot("run-merged")
    with p.expect_download() as download:
        link.click()
    with zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())) as archive:
        assert "model/model.safetensors" in archive.namelist()
    # the page opened again shows the kept merge at once: no button, the link
    page.goto(f"/runs/{run['id']}")
    assert p.is_hidden("#merge-button") and p.is_visible("#merge-download")
