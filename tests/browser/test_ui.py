"""The dashboard in headless Chromium against a real server that trains the tiny model.

Every test fails on a console error or an opened dialog (see conftest.py) and saves a screenshot of
each page it visits under test-artifacts/.
"""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest

from store.tables import STEP_COLUMNS

if TYPE_CHECKING:
    from tests.browser.conftest import Page, Server

pytestmark = pytest.mark.browser

XSS = "<script>alert(1)</script>"
TRAIN_TIMEOUT_MS = 150_000
STEPS = 300


def insert_run(server: Server, name: str, lr: float, n_steps: int = 50) -> int:
    """A finished run with a decaying loss, written straight into the server's database."""
    with sqlite3.connect(server.db) as conn:
        cursor = conn.execute(
            "INSERT INTO runs (name, kind, status, model, dataset, learning_rate, batch_size, optimizer, config,"
            " created_at, steps_done, total_steps) VALUES (?, 'train', 'completed', 'tiny-random-llama',"
            " 'synthetic-arithmetic', ?, 8, 'adamw', '{}', '2026-01-01 00:00:00.000000', ?, ?)",
            (name, lr, n_steps, n_steps),
        )
        run_id = cursor.lastrowid
        assert run_id is not None
        rows = [
            (run_id, s, s / 125, 8 * s, 80 * s, 2 + 2 / s, lr, 1.0, 50 * lr, 10.0, 5 * lr, 50.0, 0.1 * s, 0.1,
             0.9, 0.1, 0)
            for s in range(1, n_steps + 1)
        ]
        columns = ", ".join(("run_id", "step", *STEP_COLUMNS))
        marks = ", ".join("?" * (len(STEP_COLUMNS) + 2))
        conn.executemany(f"INSERT INTO step_metrics ({columns}) VALUES ({marks})", rows)
    return run_id


def wait_js(page: Page, condition: str, timeout: int = 20_000) -> None:
    page.page.wait_for_function(f"() => {condition}", timeout=timeout)


def points(page: Page, chart: str = "chart-loss", trace: int = 0) -> int:
    count: int = page.page.evaluate(
        "([id, i]) => { const g = document.getElementById(id); return g && g.data ? g.data[i].x.length : -1; }",
        [chart, trace],
    )
    return count


def test_new_run_from_the_form_trains_live(page: Page) -> None:
    p = page.page
    page.goto("/runs/new")
    p.fill("#name", "tiny from the form")
    p.select_option("#model", "tiny-random-llama")
    p.select_option("#dataset", "synthetic-arithmetic")
    # Long enough (~10 s of training) that the page sees the run while it goes, on any machine.
    p.fill("#max_steps", str(STEPS))
    p.fill("#eval_every", "100")
    p.fill("#batch_size", "100")
    plan = f"1000 samples at batch size 100 → 10 updates per epoch, {STEPS} total steps"
    assert p.text_content("#plan") == plan
    p.fill("#learning_rate", "-1")
    page.screenshot("new-run-form")
    p.click("#start-button")

    # Invalid input: the form comes back with the message next to the field and the values kept.
    assert "> 0" in p.text_content("#field-learning_rate .error")
    assert p.input_value("#name") == "tiny from the form" and p.input_value("#max_steps") == str(STEPS)
    page.screenshot("new-run-form-error")
    p.fill("#learning_rate", "0.003")
    p.click("#start-button")
    p.wait_for_url(re.compile(r"/runs/\d+$"))

    # The chart grows in place: the marker set on this document survives while points arrive.
    p.evaluate("() => { window.sameDocument = true; }")
    loss = "document.getElementById('chart-loss').data"
    wait_js(page, f"{loss} && {loss}[0].x.length > 0", TRAIN_TIMEOUT_MS)
    first = points(page)
    assert first < STEPS, "the run finished before the page saw it running"
    wait_js(page, f"{loss}[0].x.length > {first} && window.sameDocument", TRAIN_TIMEOUT_MS)
    page.screenshot("run-page-running")

    wait_js(page, "document.querySelector('#run-status').textContent.trim() === 'completed'", TRAIN_TIMEOUT_MS)
    wait_js(page, f"{loss}[0].x.length === {STEPS} && window.sameDocument")
    assert p.is_visible("#delete-form") and not p.is_visible("#cancel-form")
    assert p.text_content("#run-verdict").startswith("lr ")  # the analysis' verdict, shown without a reload
    assert points(page, trace=2) == STEPS // 100  # eval loss at steps 100, 200, 300
    assert points(page, "chart-lr") == points(page, "chart-step_scale") == STEPS  # the panels grow too
    assert p.text_content("#progress-text") == f"{STEPS} / {STEPS} steps"
    page.screenshot("run-page-completed")

    page.goto("/")
    row = p.locator("#runs-table tbody tr", has_text="tiny from the form")
    assert row.locator(".status").text_content() == "completed"
    page.screenshot("runs-list")


def test_sweep_of_three_rates_on_the_compare_page(page: Page, server: Server) -> None:
    p = page.page
    page.goto("/runs/new")
    p.fill("#name", "sweep3")
    p.select_option("#model", "tiny-random-llama")
    p.fill("#max_steps", "12")
    p.fill("#eval_every", "0")
    p.check("#sweep")
    p.fill("#sweep_lrs", "1e-2, 1e-4, 1e-3")
    assert p.text_content("#sweep-preview") == "3 runs, at learning rates 1e-4, 1e-3, 1e-2"
    p.click("#start-button")
    p.wait_for_url(re.compile(r"/sweeps/\d+$"))
    sweep_url = p.url

    # From the runs list: tick the sweep's three runs and compare them.
    page.goto("/?q=sweep3")
    for box in p.locator("#runs-table tbody input[name=ids]").all():
        box.check()
    p.click("#compare-button")
    p.wait_for_url(re.compile(r"/compare\?ids=\d+,\d+,\d+$"))
    p.wait_for_selector("body[data-ready=true]")
    legend = [t.strip() for t in p.locator("#chart-compare .legend .legendtext").all_text_contents()]
    assert [re.sub(r" · .*", "", t) for t in legend] == ["lr 1e-4", "lr 1e-3", "lr 1e-2"]

    # Running runs update live; once all three finish, every loss trace holds all 12 steps.
    loss_traces = "document.getElementById('chart-compare').data.filter(t => t.showlegend !== false)"
    wait_js(page, f"{loss_traces}.every(t => t.x.length === 12)", TRAIN_TIMEOUT_MS)
    wait_js(page, "!document.getElementById('live-note').textContent", TRAIN_TIMEOUT_MS)
    statuses = p.locator("#compare-table tbody .cell-status").all_text_contents()
    assert [s.strip() for s in statuses] == ["completed"] * 3
    p.select_option("#x-axis", "wall_time")
    chart = "document.getElementById('chart-compare')"
    wait_js(page, f"{loss_traces}.every(t => t.x.length === 12 && !Number.isInteger(t.x[0]))")  # seconds, not steps
    assert p.evaluate(f"() => {chart}.layout.xaxis.title.text") == "wall time (s)"
    p.uncheck("#log-y")
    assert p.evaluate(f"() => {chart}.layout.yaxis.type") == "linear"
    page.screenshot("compare-page")

    p.goto(sweep_url)
    p.wait_for_selector("body[data-ready=true]")
    # Final loss against learning rate: every rate is a point (a diverged one among the crosses).
    rates: Any = p.evaluate("() => document.getElementById('chart-valley').data.filter(t => t.name !== 'best loss')")
    assert sorted(x for trace in rates for x in trace["x"]) == [1e-4, 1e-3, 1e-2]
    page.screenshot("sweep-page")


def test_a_script_in_a_run_name_shows_as_text(page: Page, server: Server) -> None:
    run_id = insert_run(server, XSS, 1e-3)
    p = page.page
    page.goto(f"/?q={XSS}")
    assert p.locator("#runs-table td.name a").all_text_contents() == [XSS]
    page.screenshot("runs-list-escaped")
    page.goto(f"/runs/{run_id}")
    p.wait_for_selector("body[data-ready=true]")
    assert p.text_content("h1") == XSS
    page.goto(f"/compare?ids={run_id}")
    p.wait_for_selector("body[data-ready=true]")
    assert p.locator("#compare-table td.name a").text_content() == XSS
    assert p.locator("#chart-compare .legend .legendtext").text_content() == f"lr 1e-3 · {XSS}"
    assert page.dialogs == []


def test_pages_fit_a_narrow_window(page: Page, server: Server) -> None:
    ids = [insert_run(server, f"narrow {lr:g}", lr) for lr in (1e-4, 1e-3)]
    p = page.page
    p.set_viewport_size({"width": 390, "height": 800})
    for name, path in [
        ("runs-list", "/?q=narrow"),
        ("new-run-form", "/runs/new"),
        ("run-page", f"/runs/{ids[0]}"),
        ("compare-page", f"/compare?ids={ids[0]},{ids[1]}"),
    ]:
        page.goto(path)
        p.wait_for_load_state("networkidle")
        overflow = p.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than the window"
        page.screenshot(f"narrow-{name}")


def test_upload_a_dataset_from_the_form(page: Page, tmp_path: Any) -> None:
    file = tmp_path / "facts.jsonl"
    file.write_text("".join(f'{{"prompt": "Q{i}? ", "completion": "A{i}"}}\n' for i in range(40)))
    p = page.page
    page.goto("/runs/new")
    p.set_input_files("#upload-file", str(file))
    p.click("#field-dataset button")
    p.wait_for_function("() => document.getElementById('upload-status').textContent.startsWith('Added')")
    assert (
        p.evaluate("() => document.getElementById('dataset').selectedOptions[0].textContent") == "facts.jsonl (40 rows)"
    )
    assert p.text_content("#plan") == "36 samples at batch size 8 → 5 updates per epoch, 5 total steps"


def test_smoothing_matches_the_analysis(page: Page) -> None:
    from analysis.smoothing import ema_smooth

    values = [4.0, 3.5, None, 3.9, 2.0, 2.5, 1.0, 1.2, 0.9]
    page.goto("/runs/new")
    for weight in (0.0, 0.6, 0.9):
        smoothed = page.page.evaluate("([v, w]) => Stepscope.smooth(v, w)", [values, weight])
        expected = [None if v != v else v for v in ema_smooth(values, weight)]  # NaN: a gap, like null
        assert smoothed == pytest.approx(expected), weight


def test_a_range_test_from_the_form_suggests_a_rate_and_starts_a_sweep(page: Page, server: Server) -> None:
    p = page.page
    page.goto("/runs/new")
    assert not p.is_visible("#range-fieldset")  # only for kind lr_range_test
    p.select_option("#kind", "lr_range_test")
    assert p.is_visible("#range-fieldset") and p.is_disabled("#learning_rate") and p.is_disabled("#sweep")
    p.select_option("#model", "tiny-random-llama")
    p.select_option("#dataset", "synthetic-lookup")
    p.select_option("#optimizer", "sgd")
    p.fill("#max_grad_norm", "0")
    p.fill("#eval_every", "0")
    p.fill("#range_min_lr", "1e-4")
    p.fill("#range_max_lr", "1e3")
    assert p.text_content("#plan").endswith("100 total steps")  # a range test's default length
    p.fill("#max_steps", "60")
    page.screenshot("range-test-form")
    p.click("#start-button")
    p.wait_for_url(re.compile(r"/runs/\d+$"))

    # The suggestion and the button arrive with the end of the run, without a reload.
    p.wait_for_selector("#range-sweep-form:not([hidden])", timeout=TRAIN_TIMEOUT_MS)
    chart = "document.getElementById('chart-range')"
    names: list[str] = p.evaluate(f"() => {chart}.data.map(t => t.name)")
    assert names[:2] == ["loss", "smoothed (0.9)"]
    assert any(n.startswith("valley ") for n in names) and any(n.startswith("steepest ") for n in names)
    assert p.evaluate(f"() => {chart}.layout.xaxis.type") == "log"
    assert p.evaluate(f"() => {chart}.data[0].x.length") == 60
    assert points(page, "chart-lr") == 60
    assert p.query_selector("#run-verdict") is None and not p.is_visible("#analysis-section")
    suggestion = p.text_content("#range-suggestion") or ""
    assert suggestion.startswith("Suggested learning rate: ")
    rate = suggestion.removeprefix("Suggested learning rate: ").split(" ")[0]
    assert p.text_content("#range-sweep-button") == f"Start a sweep of 5 rates around {rate}"
    page.screenshot("range-test-page")

    p.click("#range-sweep-button")
    p.wait_for_url(re.compile(r"/sweeps/\d+$"))
    p.wait_for_selector("body[data-ready=true]")
    assert p.locator("#compare-table tbody tr").count() == 5
    sentence = "document.getElementById('recommendation-sentence').textContent"
    assert p.evaluate(f"() => {sentence}").startswith("The recommended learning rate appears here")
    # Cancel the sweep (and spare the machine five trainings): the page fetches the recommendation again.
    sweep_id = p.url.rsplit("/", 1)[1]
    urllib.request.urlopen(urllib.request.Request(f"{server.url}/api/sweeps/{sweep_id}/cancel", method="POST"))
    wait_js(page, f"{sentence}.startsWith('No rate can be recommended')", TRAIN_TIMEOUT_MS)
    page.screenshot("range-test-sweep")


def _post(server: Server, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def test_a_scripts_own_metrics_are_charted_on_its_run_page(page: Page, server: Server) -> None:
    run = _post(server, "/api/external-runs", {"name": "from a script", "learning_rate": 1e-3})
    rows = [{"step": s, "loss": 3 - s / 50, "lr": 1e-3, "accuracy": s / 100} for s in range(1, 41)]
    _post(server, f"/api/runs/{run['id']}/steps", {"rows": rows})
    _post(server, f"/api/runs/{run['id']}/finish", {"status": "completed"})
    page.goto(f"/runs/{run['id']}")
    p = page.page
    p.wait_for_selector("body[data-ready=true]")
    chart = "document.getElementById('chart-custom-accuracy')"
    p.wait_for_function(f"() => {chart} && {chart}.data && {chart}.data[0].y.length === 40")
    assert p.evaluate(f"() => {chart}.data[0].y[39]") == pytest.approx(0.4)
    assert p.evaluate(f"() => {chart}.layout.title.text") == "accuracy"
    assert page.errors == []
