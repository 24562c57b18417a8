"""Headless Chromium against a real `stepscope serve`: a page from another origin cannot change anything,
a DNS-rebinding name gets 400, and the dashboard's own pages keep working, with and without a token.

The attacker is a page served by a tiny http.server on another loopback port: for the browser that is
another origin but the *same site* (a site ignores the port), the hardest case. The stepscope server
runs no jobs here (the test holds its data directory's runner lock), so queued runs stay queued.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import sqlite3
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from tests.browser.conftest import Page, Server, serve
from tests.conftest import CHROMIUM, CHROMIUM_ARGS, free_port

pytestmark = pytest.mark.browser

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic", "max_steps": 5}
REBOUND = "evil.example"  # the browser resolves this name to 127.0.0.1, as after a DNS rebinding

ATTACK_PAGE = """<!doctype html>
<html><head><title>cute cats</title></head><body>
<iframe name="sink"></iframe>
<form id="upload" action="{s}/api/datasets" method="post" enctype="multipart/form-data" target="sink">
  <input type="file" name="file">
</form>
<script>
const S = "{s}";
const body = JSON.stringify({tiny});
const file = () => new File(['{{"text": "evil"}}\\n'], "evil.jsonl", {{type: "application/octet-stream"}});
async function attack() {{
  const form = new FormData();
  form.append("file", file());
  await Promise.allSettled([
    fetch(S + "/api/runs/{queued}/cancel", {{method: "POST", mode: "no-cors"}}),
    fetch(S + "/api/sweeps/{sweep}/cancel", {{method: "POST", mode: "no-cors"}}),
    fetch(S + "/api/lr-range-tests/{range_test}/sweep", {{method: "POST", mode: "no-cors"}}),
    fetch(S + "/api/runs", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body}}),
    fetch(S + "/api/datasets", {{method: "POST", mode: "no-cors", body: form}}),
    fetch(S + "/api/runs/{finished}", {{method: "DELETE"}}),  // needs CORS: the browser asks first
  ]);
  const input = document.querySelector("#upload input");
  const files = new DataTransfer();
  files.items.add(file());
  input.files = files.files;
  document.getElementById("upload").submit();  // a classic form post, as from any web page
}}
attack();
</script></body></html>
"""


class Attacker:
    """A web page on another loopback port, built for the stepscope server at `target`."""

    def __init__(self, html: str) -> None:
        page = html.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def chromium(playwright: Any) -> Iterator[Any]:
    """Chromium that resolves evil.example to 127.0.0.1 (what a DNS rebinding achieves)."""
    args = [*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"]
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
    yield browser
    browser.close()


class Guarded(NamedTuple):
    server: Server
    token: str


@pytest.fixture(scope="module", params=["", "s3cret"], ids=["no token", "token"])
def guarded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    """A real server that runs no jobs: the test holds the data directory's runner lock."""
    home = tmp_path_factory.mktemp("stepscope-guarded")
    with (home / "runner.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with serve(home, **({"token": request.param} if request.param else {})) as server:
            yield Guarded(server, request.param)


def api(guarded: Guarded, method: str, path: str, body: Any = None) -> Any:
    """A script's call (no Origin, no Sec-Fetch-Site), with the token when the server has one."""
    headers = {"Content-Type": "application/json"}
    if guarded.token:
        headers["Authorization"] = f"Bearer {guarded.token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(guarded.server.url + path, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def snapshot(server: Server) -> dict[str, Any]:
    with sqlite3.connect(server.db) as conn:
        runs = conn.execute("SELECT id, status, cancel_requested_at, finished_at FROM runs ORDER BY id").fetchall()
        datasets = conn.execute("SELECT id FROM datasets").fetchall()
        sweeps = conn.execute("SELECT id FROM sweeps").fetchall()
    return {"runs": runs, "datasets": datasets, "sweeps": sweeps, "files": list((server.home / "datasets").glob("*"))}


def targets(guarded: Guarded) -> dict[str, int]:
    """A queued run, a finished run, a sweep, and a completed range test with rates to sweep."""
    queued = api(guarded, "POST", "/api/runs", TINY)["id"]
    finished = api(guarded, "POST", "/api/runs", TINY)["id"]
    sweep = api(guarded, "POST", "/api/sweeps", {"config": TINY, "learning_rates": [1e-4, 1e-3]})["id"]
    range_test = api(guarded, "POST", "/api/lr-range-tests", {"config": TINY})["id"]
    found = {"suggested_lr": 3e-4, "sweep_lrs": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]}
    with sqlite3.connect(guarded.server.db) as conn:
        conn.execute(
            "UPDATE runs SET status = 'completed', finished_at = '2026-01-01 00:00:00' WHERE id = ?", (finished,)
        )
        conn.execute(
            "UPDATE runs SET status = 'completed', summary = ? WHERE id = ?",
            (json.dumps({"verdict": None, "range_test": found}), range_test),
        )
    return {"queued": queued, "finished": finished, "sweep": sweep, "range_test": range_test}


def test_a_page_from_another_origin_cannot_change_anything(chromium: Any, guarded: Guarded) -> None:
    server = guarded.server
    ids = targets(guarded)
    before = snapshot(server)
    attacker = Attacker(ATTACK_PAGE.format(s=server.url, tiny=json.dumps(TINY), **ids))
    context = chromium.new_context()
    seen: list[tuple[str, str, int]] = []
    context.on("response", lambda r: r.url.startswith(server.url) and seen.append((r.request.method, r.url, r.status)))
    try:
        page = context.new_page()
        page.goto(attacker.url)
        # Five fetches and the form post, all answered; the DELETE needs CORS, so the browser only asks
        # (a preflight, which gets no CORS headers) and never sends it. (Playwright delivers its events
        # while it is called, so the wait is its own.)
        for _ in range(300):
            uploads = [u for m, u, _ in seen if m == "POST" and u.endswith("/api/datasets")]
            if len(seen) >= 6 and len(uploads) == 2:  # the fetch's upload and the form's
                break
            page.wait_for_timeout(100)
        page.wait_for_timeout(500)
    finally:
        context.close()
        attacker.close()
    changes = [(m, u, s) for m, u, s in seen if m != "OPTIONS"]
    assert len(changes) == 6 and {s for _, _, s in changes} == {403}, seen
    assert not any(m == "DELETE" for m, _, _ in seen)  # the browser never sent it: no CORS allows it
    assert snapshot(server) == before
    assert api(guarded, "GET", f"/api/runs/{ids['queued']}")["status"] == "queued"


def test_a_rebound_host_name_gets_400(chromium: Any, guarded: Guarded) -> None:
    port = guarded.server.url.rsplit(":", 1)[1]
    context = chromium.new_context()
    try:
        page = context.new_page()
        for path in ("/", "/api/runs", "/runs/new"):
            response = page.goto(f"http://{REBOUND}:{port}{path}")
            assert response is not None and response.status == 400, path
            assert REBOUND in page.content()
        status = page.evaluate("fetch('/api/runs', {method: 'POST', body: '{}'}).then(r => r.status)")
        assert status == 400
    finally:
        context.close()


def test_the_dashboard_s_own_pages_keep_working(
    chromium: Any, guarded: Guarded, request: pytest.FixtureRequest
) -> None:
    server, token = guarded
    api(guarded, "POST", "/api/runs", {**TINY, "name": "queued by a script"})
    context = chromium.new_context()
    context.set_default_timeout(20_000)
    try:
        page = Page(context.new_page(), server.url, request.node.name)
        page.goto("/")
        if token:
            assert "/login" in page.page.url
            page.page.fill("#token", token)
            with page.page.expect_navigation():
                page.page.click("#login-form button[type=submit]")
        assert page.page.url.rstrip("/") == server.url
        assert "queued by a script" in page.page.inner_text("table")
        call = """([body, token]) => fetch('/api/runs', {method: 'POST', body,
            headers: token ? {'Content-Type': 'application/json', 'Authorization': 'Bearer ' + token}
                           : {'Content-Type': 'application/json'}}).then(r => r.status)"""
        assert page.page.evaluate(call, [json.dumps({**TINY, "name": "from the page"}), token]) == 201
        assert page.errors == [] and page.dialogs == []
    finally:
        context.close()
    assert api(guarded, "GET", "/api/runs?name=from%20the%20page")["count"] == 1
