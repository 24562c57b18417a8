"""How fast the compare page is with 10 runs of 20,000 steps each.

A real server (`stepscope serve`, a temporary STEPSCOPE_HOME, 127.0.0.1 only) over a database holding
10 finished runs x 20,000 step rows (written as the trainer writes them, rollups included). Debian's headless Chromium
(/usr/bin/chromium; never a downloaded browser) opens /compare?ids=1..10 and we measure:

- the page's own data requests (`GET /api/compare?...`, as static/compare.js sends them: the loss
  curves first, then the four panels' series): their time in the browser, then the same URLs
  fetched again and again from Python (median and worst);
- time to interactive: from navigation start until compare.js has drawn the loss curves and wired
  the controls (`window.stepscopeReadyAt`), on a cold browser cache (Plotly's 4.6 MB script
  included) and on a warm one; and the time until every panel is drawn (`stepscopePanelsAt`).

Targets (issue 4): data request < 300 ms, time to interactive < 2 s.

    .venv/bin/python bench/ui.py
    .venv/bin/python bench/ui.py --runs 10 --steps 20000 --repeats 20

It prints one table and saves it to bench/results/ui.txt.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.config import Settings  # noqa: E402
from store.db import upgrade  # noqa: E402
from store.rollups import write_steps  # noqa: E402
from tests.conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402 (the browser tests' Chromium, as they start it)

RESULTS = ROOT / "bench" / "results" / "ui.txt"
DATA_TARGET_MS = 300
TTI_TARGET_MS = 2000


def log(message: str) -> None:
    print(f"[ui] {message}", file=sys.stderr, flush=True)


# --- the database --------------------------------------------------------------------------------


def step_rows(run_id: int, lr: float, n_steps: int, rng: random.Random) -> list[tuple[Any, ...]]:
    """A noisy decaying loss with a few spikes, and optimizer metrics of plausible size."""
    rows = []
    wall = 0.0
    for step in range(1, n_steps + 1):
        loss = 1.0 + 3.0 * math.exp(-step * lr * 5) + rng.gauss(0, 0.05)
        if rng.random() < 0.001:
            loss *= 3  # a spike, which downsampling must keep
        grad = abs(rng.gauss(1.0, 0.2))
        update = lr * 50 * abs(rng.gauss(1.0, 0.1))
        wall += 0.05
        rows.append(
            (
                run_id,
                step,
                step / 1000,
                step * 8,
                step * 800,
                loss,
                lr,
                grad,
                update,
                100.0,
                update / 100,
                update / (lr * grad),
                wall,
                0.05,
                rng.uniform(0.5, 1.0),  # update_cos
                rng.gauss(0.0, 0.1),  # grad_alignment
                0,  # skipped
            )
        )
    return rows


def seed(database: Path, n_runs: int, n_steps: int) -> list[int]:
    rng = random.Random(0)
    ids = []
    with sqlite3.connect(database) as conn:
        for i in range(n_runs):
            lr = 10 ** (-5 + 3 * i / max(1, n_runs - 1))
            cursor = conn.execute(
                "INSERT INTO runs (name, kind, status, model, dataset, learning_rate, batch_size, optimizer, config,"
                " created_at, steps_done, total_steps) VALUES (?, 'train', 'completed', 'tiny-random-llama',"
                " 'synthetic-arithmetic', ?, 8, 'adamw', '{}', '2026-01-01 00:00:00.000000', ?, ?)",
                (f"bench lr={lr:.2g}", lr, n_steps, n_steps),
            )
            run_id = cursor.lastrowid
            assert run_id is not None
            write_steps(conn, run_id, step_rows(run_id, lr, n_steps, rng))  # with rollups, as the trainer writes
            ids.append(run_id)
    return ids


# --- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = os.environ | {"STEPSCOPE_HOME": str(home)}
    for name in ("STEPSCOPE_DATABASE_URL", "STEPSCOPE_TOKEN", "STEPSCOPE_HOST"):
        env.pop(name, None)
    log_file = (home / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=log_file,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: see {home / 'server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("the server did not start within 60 s")


def fetch_ms(url: str) -> tuple[float, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        size = len(response.read())
    return (time.perf_counter() - start) * 1000, size


# --- the browser ---------------------------------------------------------------------------------


def open_compare(context: Any, url: str) -> dict[str, Any]:
    """One page load in `context` (a fresh context has a cold cache, a reused one a warm cache):
    time to interactive, time until every panel is drawn, and each data request's time and URL."""
    page = context.new_page()
    errors: list[str] = []
    requests: list[Any] = []
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfinished", lambda r: "/api/compare?" in r.url and requests.append(r))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    times = page.evaluate("() => [window.stepscopeReadyAt, window.stepscopePanelsAt]")
    page.close()
    if errors:
        raise RuntimeError(f"console errors on the compare page: {errors}")
    # timing: milliseconds relative to the request's start; responseEnd is the whole request.
    data = [(r.url, float(r.timing["responseEnd"])) for r in requests]
    return {"tti": times[0], "panels": times[1], "data": data}


def measure(base: str, ids: list[int], repeats: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    url = f"{base}/compare?ids={','.join(map(str, ids))}"
    # The server's first answers pay for lazy imports and a cold SQLite cache: not what "cold" means here.
    for keys in ("loss", "lr,grad_norm,update_ratio,step_scale"):
        fetch_ms(f"{base}/api/compare?ids={','.join(map(str, ids))}&keys={keys}&max_points=1000")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        cold = []
        for _ in range(3):  # each in a new context: nothing cached
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            cold.append(open_compare(context, url))
            context.close()
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        open_compare(context, url)  # fills the cache
        warm = [open_compare(context, url) for _ in range(3)]
        context.close()
        browser.close()
    loads = cold + warm
    out: dict[str, Any] = {"requests": []}
    for i, (data_url, _) in enumerate(loads[0]["data"]):
        direct = [fetch_ms(data_url) for _ in range(repeats)]
        out["requests"].append(
            {
                "url": data_url.removeprefix(base),
                "bytes": direct[0][1],
                "browser_ms": statistics.median(load["data"][i][1] for load in loads),
                "direct_ms": statistics.median(d[0] for d in direct),
                "worst_ms": max(d[0] for d in direct),
            }
        )
    out["tti_cold_ms"] = statistics.median(c["tti"] for c in cold)
    out["tti_warm_ms"] = statistics.median(w["tti"] for w in warm)
    out["panels_cold_ms"] = statistics.median(c["panels"] for c in cold)
    out["panels_warm_ms"] = statistics.median(w["panels"] for w in warm)
    return out


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    def row(name: str, value: float, target: float | None = None) -> str:
        if target is None:
            return f"{name:<50} {value:>7.0f} ms"
        verdict = "PASS" if value < target else "FAIL"
        return f"{name:<50} {value:>7.0f} ms   target < {target:>4.0f} ms   {value / target:>5.2f}x   {verdict}"

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"compare page, {args.runs} runs x {args.steps:,} steps, headless Chromium ({CHROMIUM})",
        f"machine: {os.cpu_count()} CPUs, load average {load} (1, 5, 15 min) at the end",
        "",
    ]
    for i, req in enumerate(r["requests"], 1):
        keys = urllib.parse.parse_qs(urllib.parse.urlsplit(req["url"]).query)["keys"][0]
        lines += [
            f"data request {i}: keys {keys}, {req['bytes'] / 1024:.0f} KiB of JSON",
            row("  median of direct fetches", req["direct_ms"], DATA_TARGET_MS),
            row("  worst of direct fetches", req["worst_ms"], DATA_TARGET_MS),
            row("  median in the browser", req["browser_ms"], DATA_TARGET_MS),
        ]
    lines += [
        "",
        row("time to interactive, cold cache (median of 3)", r["tti_cold_ms"], TTI_TARGET_MS),
        row("time to interactive, warm cache (median of 3)", r["tti_warm_ms"], TTI_TARGET_MS),
        row("every panel drawn, cold cache (median of 3)", r["panels_cold_ms"]),
        row("every panel drawn, warm cache (median of 3)", r["panels_warm_ms"]),
        "",
        "time to interactive: from navigation start until the loss curves are drawn and the controls",
        "respond; the lr / grad norm / update ratio / step scale panels fill in after the second request.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=20, help="direct fetches of the data request")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing: apt-get install chromium (no browser is downloaded)")
    with tempfile.TemporaryDirectory(prefix="stepscope-ui-") as tmp:
        home = Path(tmp)
        os.environ["STEPSCOPE_HOME"] = str(home)
        settings = Settings()
        upgrade(settings.database_url)
        log(f"writing {args.runs} runs x {args.steps:,} steps")
        ids = seed(settings.db_path, args.runs, args.steps)
        port = free_port()
        server = start_server(home, port)
        try:
            log("measuring")
            result = measure(f"http://127.0.0.1:{port}", ids, args.repeats)
        finally:
            server.terminate()
            server.wait(timeout=30)
    text = report(args, result)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
