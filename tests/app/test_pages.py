"""The HTML pages, read the way a person reads them: parsed with BeautifulSoup, asserted on what shows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from bs4 import BeautifulSoup, Tag
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from app.config import Settings
from store.db import make_engine
from store.tables import Dataset, Run, RunStatus, Sweep
from trainer.config import field_help

XSS = "<script>alert(1)</script>"


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    from app.main import create_app

    return create_app(settings, run_jobs=False)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    # No `with`: the lifespan would start the job runner, and these tests only look at pages.
    yield TestClient(app, follow_redirects=False)


@pytest.fixture
def engine(settings: Settings) -> Engine:
    return make_engine(settings.database_url)


def add(engine: Engine, *rows: Any) -> list[int]:
    with Session(engine) as session:
        for row in rows:
            session.add(row)
        session.commit()
        return [row.id for row in rows]


def a_run(**fields: Any) -> Run:
    values: dict[str, Any] = {
        "name": "run",
        "model": "tiny-random-llama",
        "dataset": "synthetic-arithmetic",
        "learning_rate": 3e-4,
        "batch_size": 8,
        "status": RunStatus.completed,
        "config": {"learning_rate": 3e-4, "batch_size": 8, "model": "tiny-random-llama"},
    }
    return Run(**(values | fields))


def page(client: TestClient, url: str, status: int = 200) -> BeautifulSoup:
    response = client.get(url)
    assert response.status_code == status, response.text[:500]
    return BeautifulSoup(response.text, "html.parser")


def text(node: Tag | None) -> str:
    assert node is not None
    return " ".join(node.get_text(" ").split())


def form_values(soup: BeautifulSoup, form_id: str = "run-form") -> dict[str, str]:
    """What the browser would post for the form as shown (checked boxes, selected options, input values)."""
    form = soup.find("form", id=form_id)
    assert isinstance(form, Tag)
    values: dict[str, str] = {}
    for field in form.find_all(["input", "select"]):
        name = field.get("name")
        if not name or field.get("form") not in (None, form_id):
            continue
        if field.name == "select":
            chosen = field.find("option", selected=True) or field.find("option")
            values[name] = chosen["value"] if chosen else ""
        elif field.get("type") in ("checkbox", "radio"):
            if field.has_attr("checked"):
                values[name] = field.get("value", "on")
        elif field.get("type") != "file":
            values[name] = field.get("value", "")
    return values


def runs_in_table(soup: BeautifulSoup) -> list[str]:
    return [text(td) for td in soup.select("#runs-table tbody td.name a[href^='/runs/']")]


# --- runs list ---------------------------------------------------------------------------------------


def test_empty_list_explains_how_to_start(client: TestClient) -> None:
    soup = page(client, "/")
    empty = soup.find("section", class_="empty")
    assert "No runs yet" in text(empty)
    assert empty is not None and empty.find("a", href="/runs/new")


def test_list_shows_each_run_with_its_numbers(client: TestClient, engine: Engine) -> None:
    add(
        engine,
        a_run(name="baseline", steps_done=5, total_steps=10, last_loss=1.23456, best_loss=1.1, status="running"),
        a_run(name="higher-lr", learning_rate=1e-3, status=RunStatus.diverged),
    )
    soup = page(client, "/")
    assert runs_in_table(soup) == ["higher-lr", "baseline"]  # newest first
    cells = [text(td) for td in soup.select("#runs-table tbody tr")[1].find_all("td")]
    assert cells[1:7] == ["baseline", "running", "tiny-random-llama", "synthetic-arithmetic", "3e-4", "8"]
    assert cells[7:10] == ["5 / 10", "1.235", "1.1"]
    status = soup.select_one("#runs-table tbody tr .status")
    assert status is not None and "status-diverged" in status["class"]
    assert soup.find("button", id="compare-button")


def test_list_filters_and_sorts(client: TestClient, engine: Engine) -> None:
    add(
        engine,
        a_run(name="alpha", learning_rate=1e-2),
        a_run(name="beta", learning_rate=1e-4, status="failed"),
        a_run(name="alphabet", learning_rate=1e-3),
    )
    assert runs_in_table(page(client, "/?q=alpha")) == ["alphabet", "alpha"]
    assert runs_in_table(page(client, "/?status=failed")) == ["beta"]
    assert runs_in_table(page(client, "/?sort=lr&order=asc")) == ["beta", "alphabet", "alpha"]
    assert runs_in_table(page(client, "/?q=%25")) == []  # a % in the filter is a character, not a wildcard
    soup = page(client, "/?status=nonsense&sort=nonsense")  # bad values fall back to the defaults
    assert len(runs_in_table(soup)) == 3


def test_user_strings_are_escaped(client: TestClient, engine: Engine) -> None:
    (run_id,) = add(engine, a_run(name=XSS, dataset="up.jsonl"))
    add(engine, Dataset(name=XSS, filename="up.jsonl", format="jsonl", n_rows=20))
    for url in ("/", f"/runs/{run_id}", f"/compare?ids={run_id}", "/runs/new"):
        response = client.get(url)
        assert XSS not in response.text, url
    soup = page(client, "/")
    assert runs_in_table(soup) == [XSS]  # shown as text
    assert XSS in text(soup.select_one("#runs-table tbody tr td:nth-of-type(5)"))
    assert not [s for s in soup.find_all("script") if "alert" in s.get_text()]
    data = json.loads(text(page(client, f"/compare?ids={run_id}").find("script", id="page-data")))
    assert data["runs"][0]["name"] == XSS


# --- new-run form ------------------------------------------------------------------------------------


def test_form_has_every_field_with_default_and_help(client: TestClient) -> None:
    soup = page(client, "/runs/new")
    values = form_values(soup)
    for name, (default, description) in field_help().items():
        box = soup.find(id=f"field-{name}")
        assert box is not None, name
        assert box.find(attrs={"name": name}) is not None, name
        assert description in text(box), name
        assert "Default:" in text(box), name
        if isinstance(default, bool):
            assert (name in values) == default, name
        elif isinstance(default, list):
            assert values[name] == ", ".join(default)
        elif default is not None:
            assert values[name] == str(default), name
    assert values["learning_rate"] == "0.0002"
    assert values["optimizer"] == "adamw"
    models = [o["value"] for o in soup.select("select#model option")]
    assert {"tiny-random-llama", "smollm2-135m-instruct"} <= set(models)
    datasets = [o["value"] for o in soup.select("select#dataset option")]
    assert {"synthetic-arithmetic", "synthetic-lookup"} <= set(datasets)
    plan = text(soup.find("output", id="plan"))
    assert plan == "1000 samples at batch size 8 → 125 updates per epoch, 125 total steps"
    assert soup.find("input", attrs={"type": "file", "form": "upload-form"})
    assert soup.find("input", attrs={"name": "sweep", "type": "checkbox"})


def test_form_lists_uploaded_datasets(client: TestClient, engine: Engine) -> None:
    add(engine, Dataset(name="my facts.jsonl", filename="abc123.jsonl", format="jsonl", n_rows=500))
    soup = page(client, "/runs/new?dataset=abc123.jsonl")
    option = soup.select_one("select#dataset option[value='abc123.jsonl']")
    assert option is not None and option.has_attr("selected")
    assert "my facts.jsonl" in text(option)
    assert option["data-n-train"] == "450"  # 10% held out for eval
    assert text(soup.find("output", id="plan")).startswith("450 samples at batch size 8 → 57 updates per epoch")


def post_form(client: TestClient, changes: dict[str, str], drop: tuple[str, ...] = ()) -> Any:
    values = form_values(page(client, "/runs/new")) | changes
    for name in drop:
        values.pop(name, None)
    return client.post("/runs/new", data=values)


def test_invalid_input_is_shown_next_to_the_field_with_values_kept(client: TestClient) -> None:
    response = post_form(client, {"name": "my run", "learning_rate": "-1", "batch_size": "lots", "momentum": "0.9"})
    assert response.status_code == 200
    soup = BeautifulSoup(response.text, "html.parser")
    assert "must be a finite number > 0" in text(soup.select_one("#field-learning_rate .error"))
    assert "valid integer" in text(soup.select_one("#field-batch_size .error"))
    assert "sgd" in text(soup.select_one("#field-momentum .error"))
    assert soup.select_one("#field-epochs .error") is None
    kept = form_values(soup)
    assert (kept["name"], kept["learning_rate"], kept["batch_size"]) == ("my run", "-1", "lots")
    assert soup.select_one("#learning_rate")["aria-invalid"] == "true"
    assert "3 fields need a change" in text(soup.find(class_="alert"))


def test_valid_form_queues_a_run(client: TestClient, engine: Engine) -> None:
    response = post_form(client, {"name": "tiny", "model": "tiny-random-llama", "max_steps": "5", "use_rslora": "on"})
    assert response.status_code == 303
    with Session(engine) as session:
        run = session.exec(select(Run)).one()
    assert response.headers["location"] == f"/runs/{run.id}"
    assert (run.name, run.model, run.status, run.total_steps) == ("tiny", "tiny-random-llama", "queued", 5)
    assert run.config["use_rslora"] is True and run.config["max_steps"] == 5
    assert run.config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_unknown_model_error_from_the_service_shows_at_the_model(client: TestClient, engine: Engine) -> None:
    response = post_form(client, {"model": "no-such-model"})
    assert response.status_code == 200
    soup = BeautifulSoup(response.text, "html.parser")
    assert "unknown model" in text(soup.select_one("#field-model .error"))
    assert form_values(soup)["model"] == "no-such-model"  # kept, as an extra option
    with Session(engine) as session:
        assert session.exec(select(Run)).all() == []


def test_sweep_starts_one_run_per_rate(client: TestClient, engine: Engine) -> None:
    changes = {"model": "tiny-random-llama", "sweep": "on", "sweep_mode": "list", "sweep_lrs": "1e-3, 1e-4 3e-4"}
    response = post_form(client, changes | {"learning_rate": "not used"})
    assert response.status_code == 303
    with Session(engine) as session:
        sweep = session.exec(select(Sweep)).one()
        rates = sorted(r.learning_rate for r in session.exec(select(Run).where(Run.sweep_id == sweep.id)))
    assert response.headers["location"] == f"/sweeps/{sweep.id}"
    assert rates == [1e-4, 3e-4, 1e-3]
    soup = page(client, f"/sweeps/{sweep.id}")
    assert [text(td) for td in soup.select("#compare-table tbody td:nth-of-type(2)")] == ["1e-4", "3e-4", "1e-3"]
    assert soup.find(id="chart-valley") and soup.find(id="chart-compare")


def test_sweep_log_spaced_and_its_errors(client: TestClient, engine: Engine) -> None:
    sweep = {"model": "tiny-random-llama", "sweep": "on", "sweep_mode": "range", "sweep_min": "1e-5"}
    response = post_form(client, sweep | {"sweep_max": "1e-3", "sweep_count": "1"})
    assert response.status_code == 200
    soup = BeautifulSoup(response.text, "html.parser")
    assert "from 2 to" in text(soup.select_one("#field-sweep_range .error"))
    assert form_values(soup)["sweep_count"] == "1" and form_values(soup)["sweep_mode"] == "range"
    response = post_form(client, sweep | {"sweep_max": "1e-3", "sweep_count": "3"})
    assert response.status_code == 303
    with Session(engine) as session:
        assert sorted(r.learning_rate for r in session.exec(select(Run))) == [1e-5, 1e-4, 1e-3]


def test_posts_without_the_csrf_token_are_refused(client: TestClient, engine: Engine) -> None:
    values = form_values(page(client, "/runs/new"))
    assert client.post("/runs/new", data={k: v for k, v in values.items() if k != "csrf_token"}).status_code == 403
    assert client.post("/runs/new", data=values | {"csrf_token": "x" * 43}).status_code == 403
    cross_site = client.post("/runs/new", data=values, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross_site.status_code == 403
    fresh = TestClient(client.app, follow_redirects=False)  # another browser: no cookie
    assert fresh.post("/runs/new", data=values).status_code == 403
    with Session(engine) as session:
        assert session.exec(select(Run)).all() == []


def test_clone_opens_the_form_prefilled(client: TestClient, engine: Engine) -> None:
    config = {"learning_rate": 0.001, "batch_size": 4, "model": "tiny-random-llama", "target_modules": ["q_proj"]}
    (run_id,) = add(engine, a_run(name="source", config=config))
    soup = page(client, f"/runs/new?clone={run_id}")
    values = form_values(soup)
    assert (values["learning_rate"], values["batch_size"], values["model"]) == ("0.001", "4", "tiny-random-llama")
    assert values["target_modules"] == "q_proj" and values["name"] == ""
    assert "source" in text(soup.find(class_="note"))
    page(client, "/runs/new?clone=999", status=404)


def test_upload_from_the_form(client: TestClient, engine: Engine) -> None:
    token = form_values(page(client, "/runs/new"))["csrf_token"]
    rows = "\n".join(json.dumps({"prompt": f"Q{i}", "completion": f"A{i}"}) for i in range(20))
    files = {"file": ("facts.jsonl", rows.encode(), "application/json")}
    as_json = {"Accept": "application/json"}
    answer = client.post("/datasets/upload", data={"csrf_token": token}, files=files, headers=as_json)
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] == "facts.jsonl (20 rows)" and answer.json()["n_train"] == 18
    with Session(engine) as session:
        dataset = session.exec(select(Dataset)).one()
    assert answer.json()["value"] == dataset.filename
    bad = client.post("/datasets/upload", data={"csrf_token": token}, files={"file": ("x.csv", b"nothing\n")})
    assert bad.status_code == 422
    assert page(client, "/runs/new").select_one(f"select#dataset option[value='{dataset.filename}']")


# --- run page ----------------------------------------------------------------------------------------


def test_run_page_shows_status_progress_links_and_charts(client: TestClient, engine: Engine) -> None:
    (run_id,) = add(engine, a_run(name="live one", status=RunStatus.running, steps_done=30, total_steps=120))
    soup = page(client, f"/runs/{run_id}")
    assert text(soup.find("h1")) == "live one"
    assert text(soup.find(id="run-status")) == "running"
    assert text(soup.find(id="progress-text")) == "30 / 120 steps"
    assert soup.find("form", action=f"/runs/{run_id}/cancel")
    assert soup.find("form", action=f"/runs/{run_id}/delete").has_attr("hidden")  # shown once it finishes
    assert soup.find("a", href=f"/runs/new?clone={run_id}")
    assert soup.find("a", href=f"/api/runs/{run_id}/metrics.csv") and soup.find("a", href=f"/api/runs/{run_id}")
    for chart in ("loss", "lr", "grad_norm", "update_norm", "update_ratio", "step_scale"):
        assert soup.find(id=f"chart-{chart}"), chart
    assert soup.find("script", src="/static/vendor/plotly.min.js")
    assert json.loads(text(soup.find("script", id="page-data")))["id"] == run_id
    assert soup.find(id="run-error").has_attr("hidden")


def test_failed_run_shows_its_error_and_step(client: TestClient, engine: Engine) -> None:
    summary = {"verdict": "diverged", "reason": "The loss became non-finite at step 7.", "final_loss": 9.5}
    (run_id,) = add(
        engine,
        a_run(status=RunStatus.diverged, error="loss is NaN", error_step=7, summary=summary, verdict="diverged"),
    )
    soup = page(client, f"/runs/{run_id}")
    error = soup.find(id="run-error")
    assert error is not None and not error.has_attr("hidden")
    assert text(error) == "Diverged at step 7: loss is NaN"
    assert "lr diverged" in text(soup.find(id="run-verdict"))
    assert "non-finite at step 7" in text(soup.find(id="analysis-reason"))
    assert not soup.find("form", action=f"/runs/{run_id}/delete").has_attr("hidden")
    assert not soup.find("form", action=f"/runs/{run_id}/cancel")


def test_cancel_and_delete_from_the_run_page(client: TestClient, engine: Engine) -> None:
    (run_id,) = add(engine, a_run(status=RunStatus.queued))
    token = form_values(page(client, f"/runs/{run_id}"), "cancel-form")["csrf_token"]
    response = client.post(f"/runs/{run_id}/cancel", data={"csrf_token": token})
    assert (response.status_code, response.headers["location"]) == (303, f"/runs/{run_id}")
    assert text(page(client, f"/runs/{run_id}").find(id="run-status")) == "cancelled"
    response = client.post(f"/runs/{run_id}/delete", data={"csrf_token": token})
    assert (response.status_code, response.headers["location"]) == (303, "/")
    page(client, f"/runs/{run_id}", status=404)


def test_a_running_run_cannot_be_deleted(client: TestClient, engine: Engine) -> None:
    (run_id,) = add(engine, a_run(status=RunStatus.running))
    token = form_values(page(client, f"/runs/{run_id}"), "cancel-form")["csrf_token"]
    response = client.post(f"/runs/{run_id}/delete", data={"csrf_token": token})
    assert response.status_code == 409
    assert "cancel it first" in response.text


def test_missing_pages_say_so(client: TestClient) -> None:
    assert "does not exist" in text(page(client, "/runs/42", status=404).find("main"))
    page(client, "/sweeps/42", status=404)


# --- compare and sweep pages -------------------------------------------------------------------------


def test_compare_page_lists_the_chosen_runs_by_learning_rate(client: TestClient, engine: Engine) -> None:
    summary = {"final_loss": 0.5, "best_loss": 0.4, "t90": 120, "sign_change_rate": 0.61, "median_step_scale": 3.2}
    ids = add(
        engine,
        a_run(name="fast", learning_rate=1e-2, last_loss=2.0),
        a_run(name="slow", learning_rate=1e-4, summary=summary, verdict="ok"),
        a_run(name="not chosen"),
    )
    soup = page(client, f"/compare?ids={ids[0]},{ids[1]}&ids=999,x,{2**70}")
    rows = soup.select("#compare-table tbody tr")
    assert [text(r.find("td")) for r in rows] == ["slow", "fast"]
    slow = [text(td) for td in rows[0].find_all("td")]
    assert slow[1] == "1e-4" and slow[4:10] == ["0.5", "0.4", "lr ok", "120", "0.61", "—"] and slow[-1] == "3.2"
    assert [text(td) for td in rows[1].find_all("td")][4] == "2"  # no analysis yet: the last loss
    data = json.loads(text(soup.find("script", id="page-data")))
    assert [r["id"] for r in data["runs"]] == [ids[1], ids[0]]
    for control in ("smoothing", "x-axis", "log-y"):
        assert soup.find(id=control), control
    assert [o["value"] for o in soup.select("#x-axis option")] == ["step", "epoch", "samples", "wall_time"]


def test_compare_page_judges_comparable_runs_against_each_other(client: TestClient, engine: Engine) -> None:
    # Stored verdicts from each run alone; on the page, runs of one model, data and budget are compared.
    best = {"final_loss": 1.0, "verdict": "too_high", "reason": "alone"}
    slow = {"final_loss": 2.0, "verdict": "ok", "reason": "alone"}
    ids = add(
        engine,
        a_run(name="best", learning_rate=1e-3, summary=best, verdict="too_high", total_steps=100),
        a_run(name="slow", learning_rate=1e-5, summary=slow, verdict="ok", total_steps=100),
    )
    soup = page(client, f"/compare?ids={ids[0]},{ids[1]}")
    cells = {text(r.find("td")): r.select_one(".cell-verdict .verdict") for r in soup.select("#compare-table tbody tr")}
    assert text(cells["best"]) == "lr ok" and text(cells["slow"]) == "lr too low"
    assert "against 1 at lr 0.001" in cells["slow"]["title"]
    assert text(soup.find(id="recommended-lr")).startswith("Recommended learning rate: 1e-3")
    longer = add(engine, a_run(name="longer", learning_rate=1e-4, summary=slow, verdict="ok", total_steps=500))
    mixed = page(client, f"/compare?ids={ids[0]},{longer[0]}")  # another step budget: each keeps its own
    assert [text(c) for c in mixed.select(".cell-verdict .verdict")] == ["lr ok", "lr too high"]


def test_compare_without_runs_explains(client: TestClient) -> None:
    soup = page(client, "/compare")
    assert "Tick some runs" in text(soup.find("section", class_="empty"))
    assert not soup.find("script", src="/static/vendor/plotly.min.js")


def test_sweep_page_shows_the_recommendation(client: TestClient, engine: Engine) -> None:
    (sweep_id,) = add(engine, Sweep(name="lrs", learning_rates=[1e-4, 1e-3]))

    def summary(loss: float) -> dict[str, Any]:
        return {"final_loss": loss, "verdict": "ok"}

    add(
        engine,
        a_run(name="a", learning_rate=1e-4, sweep_id=sweep_id, summary=summary(2.0), verdict="ok"),
        a_run(name="b", learning_rate=1e-3, sweep_id=sweep_id, summary=summary(1.0), verdict="ok"),
    )
    soup = page(client, f"/sweeps/{sweep_id}")
    assert text(soup.find("h1")) == "Sweep: lrs"
    assert "Recommended learning rate: 1e-3" in text(soup.find(id="recommendation"))
    assert json.loads(text(soup.find("script", id="page-data")))["analysis"]["recommended_lr"] == 1e-3


# --- LR range tests and the insight on the pages -----------------------------------------------------------

RANGE_TEST = {"suggested_lr": 3e-4, "valley_lr": 3e-4, "steepest_lr": 1e-3, "min_loss_lr": 1e-2, "stop_index": 80,
              "sweep_lrs": [3e-5, 9.49e-5, 3e-4, 9.49e-4, 3e-3], "smoothing_weight": 0.9, "skip_start": 8}  # fmt: skip


def a_range_test(**fields: Any) -> Run:
    config = {"kind": "lr_range_test", "range_min_lr": 1e-7, "range_max_lr": 1.0, "max_steps": 100}
    config |= {"model": "tiny-random-llama", "dataset": "synthetic-arithmetic", "optimizer": "sgd", "batch_size": 4}
    values: dict[str, Any] = {"name": "finder", "kind": "lr_range_test", "config": config, "total_steps": 100}
    return a_run(**(values | fields))


def test_the_form_offers_a_range_test_and_queues_one(client: TestClient, engine: Engine) -> None:
    soup = page(client, "/runs/new")
    options = {o["value"]: text(o) for o in soup.select("select#kind option")}
    assert options["train"].startswith("train: one run")
    assert "LR range test" in options["lr_range_test"]
    fieldset = soup.find("fieldset", id="range-fieldset")
    assert fieldset is not None and fieldset.find(attrs={"name": "range_min_lr"})
    explained = text(soup.find(id="range-explained"))
    assert "grows exponentially" in explained and "valley rule" in explained and "100 when empty" in explained

    response = post_form(client, {"model": "tiny-random-llama", "kind": "lr_range_test", "range_max_lr": "0.1"})
    assert response.status_code == 303
    with Session(engine) as session:
        run = session.exec(select(Run)).one()
    assert (run.kind, run.total_steps, run.config["range_max_lr"]) == ("lr_range_test", 100, 0.1)
    assert run.name == "lr range 1e-07 to 0.1, adamw bs=8"

    wrong = post_form(client, {"kind": "lr_range_test", "range_min_lr": "1", "range_max_lr": "0.1"})
    error = BeautifulSoup(wrong.text, "html.parser").select_one("#field-range_max_lr .error")
    assert "must be above range_min_lr" in text(error)


def test_a_finished_range_test_shows_its_chart_suggestion_and_sweep_button(client: TestClient, engine: Engine) -> None:
    (run_id,) = add(engine, a_range_test(summary={"verdict": "ok", "range_test": RANGE_TEST}, verdict="ok"))
    soup = page(client, f"/runs/{run_id}")
    section = soup.find("section", id="range-test")
    assert section is not None and section.find(id="chart-range") is not None
    assert "from 1e-7 to 1e0 over 100 steps" in text(section)
    assert text(soup.find(id="range-suggestion")) == (
        "Suggested learning rate: 3e-4 (a tenth of the minimum's 1e-2; valley 3e-4, steepest 1e-3)"
    )
    form = soup.find("form", id="range-sweep-form")
    assert form is not None and not form.has_attr("hidden") and form["action"] == f"/runs/{run_id}/range-sweep"
    assert text(form.find("button")) == "Start a sweep of 5 rates around 3e-4"
    assert text(form.find(id="range-sweep-rates")).startswith("3e-5, 9.49e-5, 3e-4, 9.49e-4, 3e-3")
    data = json.loads(text(soup.find("script", id="page-data")))
    assert data["kind"] == "lr_range_test" and data["range_test"] == RANGE_TEST and data["range_smoothing"] == 0.9
    # A rate that grows by design: no verdict badge, no constant-rate analysis.
    assert soup.find(id="run-verdict") is None and soup.find(id="analysis-section").has_attr("hidden")

    response = client.post(form["action"], data=form_values(soup, "range-sweep-form"))
    assert response.status_code == 303
    with Session(engine) as session:
        sweep = session.exec(select(Sweep)).one()
        runs = session.exec(select(Run).where(Run.sweep_id == sweep.id).order_by(col(Run.learning_rate))).all()
    assert response.headers["location"] == f"/sweeps/{sweep.id}"
    assert [r.learning_rate for r in runs] == RANGE_TEST["sweep_lrs"]
    assert {(r.kind, r.optimizer, r.batch_size, r.total_steps, r.status) for r in runs} == {
        ("train", "sgd", 4, 100, "queued")
    }


def test_a_running_range_test_has_its_chart_but_no_sweep_button_yet(client: TestClient, engine: Engine) -> None:
    (run_id,) = add(engine, a_range_test(status=RunStatus.running))
    soup = page(client, f"/runs/{run_id}")
    assert soup.find(id="chart-range") is not None
    assert text(soup.find(id="range-suggestion")) == "The suggestion appears when the test ends."
    assert soup.find("form", id="range-sweep-form").has_attr("hidden")
    token = form_values(soup, "cancel-form")["csrf_token"]
    refused = client.post(f"/runs/{run_id}/range-sweep", data={"csrf_token": token})
    assert refused.status_code == 409 and "has not completed" in text(BeautifulSoup(refused.text, "html.parser"))
    assert client.post(f"/runs/{run_id}/range-sweep", data={}).status_code == 403  # no CSRF token
    (train_id,) = add(engine, a_run())
    assert page(client, f"/runs/{train_id}").find(id="range-test") is None
    assert client.post(f"/runs/{train_id}/range-sweep", data={"csrf_token": token}).status_code == 409
    with Session(engine) as session:
        assert session.exec(select(Sweep)).all() == []


def test_the_list_shows_verdicts_with_reasons_and_range_tests_with_their_suggestion(
    client: TestClient, engine: Engine
) -> None:
    add(
        engine,
        a_run(name="trained", summary={"verdict": "too_high", "reason": "It bounced."}, verdict="too_high"),
        a_range_test(summary={"verdict": "diverged", "range_test": RANGE_TEST}, verdict="diverged"),
    )
    soup = page(client, "/?sort=name&order=asc")
    finder, trained = soup.select("#runs-table tbody tr")
    verdict = trained.select_one(".verdict")
    assert verdict is not None and text(verdict) == "lr too high" and verdict["title"] == "It bounced."
    assert text(finder.select_one(".cell-status")) == "completed range test → 3e-4"
    assert finder.select_one(".verdict") is None  # a range test blows the loss up on purpose: no verdict shown
    assert text(finder.find_all("td")[5]) == "1e-7 → 1e0"


def test_sweep_page_marks_the_recommended_run_and_shows_every_score(client: TestClient, engine: Engine) -> None:
    (sweep_id,) = add(engine, Sweep(name="lrs", learning_rates=[1e-4, 1e-3]))
    scores = {"t90": 12, "sign_change_rate": 0.5, "tv_ratio": 1.25, "spike_count": 2, "auc_norm": 0.125}
    low, high = add(
        engine,
        a_run(name="a", learning_rate=1e-4, sweep_id=sweep_id, summary={"final_loss": 2.0, "verdict": "ok"}),
        a_run(name="b", learning_rate=1e-3, sweep_id=sweep_id, summary={"final_loss": 1.0, "verdict": "ok"} | scores),
    )
    soup = page(client, f"/sweeps/{sweep_id}")
    headers = [text(th) for th in soup.select("#compare-table thead th")]
    assert headers[7:12] == ["t90", "Sign changes", "TV ratio", "Spikes", "AUC"]
    rows = soup.select("#compare-table tbody tr")
    assert [r.get("class") for r in rows] == [None, ["recommended"]]
    assert [text(td) for td in rows[1].find_all("td")][7:12] == ["12", "0.5", "1.25", "2", "0.125"]
    sentence = text(soup.find(id="recommendation-sentence"))
    assert sentence.startswith(f"Recommended learning rate 0.001 (run {high})")

    (empty_id,) = add(engine, Sweep(name="new", learning_rates=[1e-4]))
    add(engine, a_run(name="c", sweep_id=empty_id, status=RunStatus.queued))
    waiting = text(page(client, f"/sweeps/{empty_id}").find(id="recommendation"))
    assert waiting == "The recommended learning rate appears here once runs complete."


# --- sign-in with a token ----------------------------------------------------------------------------


def test_with_a_token_pages_need_a_sign_in(home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.main import create_app
    from store.db import upgrade

    monkeypatch.setenv("STEPSCOPE_TOKEN", "s3cret")
    settings = Settings()
    upgrade(settings.database_url)
    client = TestClient(create_app(settings, run_jobs=False), follow_redirects=False)
    response = client.get("/runs/new?clone=1")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fruns%2Fnew%3Fclone%3D1"
    token = form_values(page(client, "/login"), "login-form")["csrf_token"]
    wrong = client.post("/login", data={"csrf_token": token, "token": "guess", "next": "/"})
    assert wrong.status_code == 401
    assert "not the server's token" in text(BeautifulSoup(wrong.text, "html.parser").find(class_="error"))
    right = client.post("/login", data={"csrf_token": token, "token": "s3cret", "next": "//evil.example/"})
    assert (right.status_code, right.headers["location"]) == (303, "/")
    assert "s3cret" not in right.headers["set-cookie"]
    page(client, "/")
