"""Issue 13 in the browser: a sweep's loss map drawn from its page's button, and a run's cross-sections and heat map."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.browser.conftest import api
from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.browser.conftest import Page, Server

pytestmark = pytest.mark.browser
RATES = [1e-4, 1e-3, 1e-2]


def test_a_sweeps_map_and_a_runs_cross_sections(page: Page, server: Server) -> None:
    config = {"model": "tiny-random-llama", "max_steps": 12, "eval_every": 0, "probe_every": 3, "map_snapshots": 6,
              "module_norms_every": 3}  # fmt: skip
    sweep = api(server, "/api/sweeps", {"name": "walk", "config": config, "learning_rates": RATES})

    def finished() -> bool:
        runs = api(server, f"/api/runs?sweep_id={sweep['id']}")["data"]
        return len(runs) == 3 and all(r["status"] == "completed" for r in runs)

    wait_for(finished, timeout=240, what="the sweep's three runs")
    runs = sorted(api(server, f"/api/runs?sweep_id={sweep['id']}")["data"], key=lambda r: r["learning_rate"])

    p = page.page
    page.goto(f"/sweeps/{sweep['id']}")
    p.wait_for_selector("body[data-ready=true]")
    p.click("#map-button")
    p.wait_for_selector("#map-section[data-ready=true]", timeout=180_000)
    paths: Any = p.evaluate("() => document.getElementById('chart-map').data.filter(t => t.meta === 'path')")
    assert len(paths) == 3
    assert [t["name"] for t in paths] == [
        f"run {r['id']}, lr {lr}" for r, lr in zip(runs, ["1e-4", "1e-3", "1e-2"], strict=True)
    ]
    assert all((t["x"][0], t["y"][0]) == (0, 0) and len(t["x"]) == 7 for t in paths)  # start + 6 snapshots
    contour: Any = p.evaluate("() => document.getElementById('chart-map').data[0]")
    assert contour["type"] == "contour" and len(contour["z"]) == 21
    assert "paths on a 21×21 grid" in p.text_content("#map-status")
    page.screenshot("loss-map")
    # The page made once shows the stored map at once: no button
    page.goto(f"/sweeps/{sweep['id']}")
    p.wait_for_selector("#map-section[data-ready=true]")
    assert p.is_hidden("#map-button")

    page.goto(f"/runs/{runs[2]['id']}")
    p.wait_for_selector("#walk[data-ready=true]")
    curves: Any = p.evaluate(
        "() => document.getElementById('chart-probes').data.filter(t => t.mode === 'lines+markers')"
    )
    assert [c["name"] for c in curves] == [f"step {s}" for s in (1, 3, 6, 9, 12)]
    assert all(len(c["y"]) == 9 for c in curves)
    best: Any = p.evaluate("() => document.getElementById('chart-best-alpha').data[0]")
    assert best["x"] == [1, 3, 6, 9, 12] and all(v is not None for v in best["y"])
    reading = api(server, f"/api/runs/{runs[2]['id']}/probes")["reading"]
    assert p.text_content("#probe-reading") == f"{reading} (median over the second half of 5 probes)"
    heat: Any = p.evaluate("() => document.getElementById('chart-modules').data[0]")
    assert heat["type"] == "heatmap" and heat["x"][:2] == ["q_proj.A", "q_proj.B"] and len(heat["y"]) == 2
    over_steps: Any = p.evaluate("() => document.getElementById('chart-modules-steps').data[0]")
    assert over_steps["x"] == [1, 3, 6, 9, 12] and len(over_steps["y"]) == 16
    page.screenshot("run-walk")
