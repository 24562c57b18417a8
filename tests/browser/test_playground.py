"""What each rate learned, in the browser: a sweep's page shows each run's answers and accuracy (and a run's
own page its own), and the playground streams a typed prompt's answers from two runs' adapters and the base
model, side by side."""

from __future__ import annotations

import json
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.browser.conftest import Page, Server

pytestmark = pytest.mark.browser

CONFIG = {"model": "tiny-random-llama", "dataset": "synthetic-lookup", "max_steps": 40, "eval_every": 20,
          "batch_size": 16, "checkpoint_every": 0}  # fmt: skip
GOOD, SMALL = 1e-2, 1e-5  # the good rate learns the lookup in 40 steps, the small one nothing (tests/trainer)


def _json(server: Server, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


@pytest.fixture(scope="module")
def sweep(server: Server) -> dict[str, Any]:
    created = _json(server, "/api/sweeps", {"name": "answers", "config": CONFIG, "learning_rates": [GOOD, SMALL]})

    def finished() -> dict[str, Any] | None:
        found = _json(server, f"/api/sweeps/{created['id']}")
        return found if all(r["status"] == "completed" for r in found["runs"]) else None

    return wait_for(finished, timeout=240, what="the sweep's two runs to complete")


def test_the_sweep_page_shows_each_rates_answers_and_accuracy(page: Page, sweep: dict[str, Any]) -> None:
    p = page.page
    page.goto(f"/sweeps/{sweep['id']}")
    p.wait_for_selector("#answers:not([hidden]) #answers-table tbody tr")
    headers = [t.strip() for t in p.locator("#answers-table thead th").all_text_contents()]
    assert headers == ["Prompt", "Expected", "lr 1e-5", "lr 1e-2"]  # by learning rate, as the charts
    rows = p.locator("#answers-table tbody tr")
    assert rows.count() == 8
    good = p.locator(f"#answers-table tbody td.answer[data-run-id='{_run_id(sweep, GOOD)}']")
    small = p.locator(f"#answers-table tbody td.answer[data-run-id='{_run_id(sweep, SMALL)}']")
    assert good.evaluate_all("cells => cells.filter(c => c.classList.contains('exact')).length") >= 7
    assert small.evaluate_all("cells => cells.filter(c => c.classList.contains('exact')).length") == 0
    chart = "document.getElementById('chart-accuracy')"
    p.wait_for_function(f"() => {chart}.data && {chart}.data.length === 2")
    assert p.evaluate(f"() => {chart}.data.map(t => t.x)") == [[20, 40], [20, 40]]
    # the slider goes back to the first eval step: each run's answers there
    p.locator("#answers-step").fill("0")
    assert p.text_content("#answers-step-value") == "20"
    page.screenshot("sweep-answers")


def test_a_run_s_own_page_shows_what_it_answers(page: Page, sweep: dict[str, Any]) -> None:
    p = page.page
    good = _run_id(sweep, GOOD)
    page.goto(f"/runs/{good}")
    p.wait_for_selector("#answers:not([hidden]) #answers-table tbody tr")
    assert p.text_content("#answers h2") == "What it answers"
    headers = [t.strip() for t in p.locator("#answers-table thead th").all_text_contents()]
    assert headers == ["Prompt", "Expected", "lr 1e-2"]  # this run alone
    cells = p.locator("#answers-table tbody td.answer")
    assert cells.count() == 8 and cells.evaluate_all("cs => cs.filter(c => c.classList.contains('exact')).length") >= 7
    chart = "document.getElementById('chart-accuracy')"
    p.wait_for_function(f"() => {chart}.data && {chart}.data.length === 1")
    assert p.get_attribute("#answers-playground", "href") == f"/playground?ids={good}"


def _run_id(sweep: dict[str, Any], lr: float) -> int:
    return int(next(r["id"] for r in sweep["runs"] if r["learning_rate"] == lr))


def test_the_playground_streams_two_runs_and_the_base_model(page: Page, sweep: dict[str, Any]) -> None:
    p = page.page
    good, small = _run_id(sweep, GOOD), _run_id(sweep, SMALL)
    page.goto(f"/playground?ids={good}")
    assert p.is_checked(f"input[name=run][value='{good}']")
    p.check(f"input[name=run][value='{small}']")
    p.fill("#prompt", "The otter is ")
    p.fill("#max_new_tokens", "8")
    p.click("#generate")
    p.wait_for_function("() => document.getElementById('playground-status').textContent === 'Done.'", timeout=60_000)
    titles = [t.strip() for t in p.locator(".playground-answer h3").all_text_contents()]
    assert titles[0] == "base: tiny-random-llama" and len(titles) == 3
    assert "lr 1e-5" in titles[1] and "lr 1e-2" in titles[2]  # by learning rate, as on the compare page
    answers = p.locator(".playground-answer pre").all_text_contents()
    assert answers[2] == "amber"  # the colour of the otter, learnt at the good rate
    assert answers[0] and answers[1] and "amber" not in (answers[0], answers[1])
    page.screenshot("playground")
