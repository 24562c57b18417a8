"""The runs list and a run's page, with its actions (cancel, delete, the range test's one-click sweep)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import func
from sqlmodel import Session, select

from analysis.range_test import RANGE_TEST_SMOOTHING
from app import services
from app.deps import RunId, SessionDep, SettingsDep
from app.pages.compare import compare_rows, map_context
from app.pages.render import CheckedForm, not_found, render, require_sign_in
from app.routers.lr_range import suggested_sweep
from app.runner.merges import merge_state
from store.merges import has_adapter
from store.tables import FINISHED, Dataset, Run, RunStatus, Sweep
from trainer.config import ConfigError

router = APIRouter(dependencies=[Depends(require_sign_in)])

ANALYSIS_LABELS = [
    ("initial_loss", "Initial loss (smoothed)"),
    ("final_loss", "Final loss (smoothed)"),
    ("best_loss", "Best loss (smoothed)"),
    ("t90", "Step reaching 90% of the drop"),
    ("sign_change_rate", "Direction changes of the loss"),
    ("tv_ratio", "Distance travelled / net drop"),
    ("median_update_ratio", "Median ‖Δw‖/‖w‖"),
    ("median_step_scale", "Median ‖Δw‖/(lr·‖g‖)"),
    ("spike_count", "Loss spikes"),
    ("grad_spike_count", "Gradient-norm spikes"),
    ("grad_alignment_mean", "Mean gradient alignment (last ⅔)"),
    ("update_cos_mean", "Mean update cosine (last ⅔)"),
    ("final_eval_loss", "Final eval loss (smoothed)"),
]


def dataset_names(session: Session) -> dict[str, str]:
    """Uploaded datasets' stored file names -> the names people gave them."""
    return {d.filename: d.name for d in session.exec(select(Dataset)).all()}


LIST_LIMIT = 500  # rows on the runs list; filters find older ones

PAGE_SORTS = {
    "name": "name",
    "status": "status",
    "model": "model",
    "dataset": "dataset",
    "lr": "learning_rate",
    "batch": "batch_size",
    "steps": "steps_done",
    "last_loss": "last_loss",
    "best_loss": "best_loss",
    "started": "started_at",
    "created": "id",
}
"""The list's column headers' short sort names, and the runs-list sort (app.services.SORTS) each stands for."""


@router.get("/", response_class=HTMLResponse)
def runs_list(
    request: Request,
    session: SessionDep,
    status: str = "",
    q: str = "",
    sort: str = "created",
    order: str = "desc",
) -> HTMLResponse:
    sort = sort if sort in PAGE_SORTS else "created"
    statuses = [RunStatus(status)] if status in RunStatus.__members__ else None
    filters, order_by = services.runs_filter(statuses, name=q, sort=PAGE_SORTS[sort], descending=order != "asc")
    runs = session.exec(select(Run).where(*filters).order_by(*order_by).limit(LIST_LIMIT)).all()
    total = session.exec(select(func.count()).select_from(Run)).one()
    context = {
        "runs": runs,
        "total": total,
        "dataset_names": dataset_names(session),
        "statuses": list(RunStatus),
        "limit": LIST_LIMIT,
        "filters": {"status": status, "q": q, "sort": sort, "order": order},
    }
    return render(request, "runs.html", context)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, session: SessionDep, settings: SettingsDep, run_id: RunId) -> HTMLResponse:
    run = session.get(Run, run_id)
    if run is None:
        return not_found(request, f"Run {run_id}")
    sweep = session.get(Sweep, run.sweep_id) if run.sweep_id else None
    range_test = (run.summary or {}).get("range_test") if run.kind == "lr_range_test" else None
    page = {
        "id": run.id,
        "kind": run.kind,
        "status": run.status,
        "total_steps": run.total_steps,
        "steps_done": run.steps_done,
        "analysis_labels": ANALYSIS_LABELS,
        "range_test": range_test,
        "range_smoothing": RANGE_TEST_SMOOTHING,
        "runs": compare_rows([run]) if run.kind == "train" else [],  # its answers (static/answers.js)
    }
    context = {
        "run": run,
        "sweep": sweep,
        "range_test": range_test,
        "page": page,
        "finished": run.status in FINISHED,
        "dataset_name": dataset_names(session).get(run.dataset, run.dataset),
        "analysis_labels": ANALYSIS_LABELS,
        "map": map_context(session, [run_id]) if run.kind == "train" else None,
        "merge": merge_context(settings.runs_dir / str(run_id)) if run.status in FINISHED else None,
    }
    return render(request, "run.html", context)


def merge_context(run_dir: Path) -> dict[str, str] | None:
    """The run page's *take the model away* section: only for a run with a saved adapter."""
    if not has_adapter(run_dir):
        return None
    state = merge_state(run_dir)
    return {"status": state["status"] if state else "none"}


@router.post("/runs/{run_id}/merge", response_model=None)
def merge_run(session: SessionDep, settings: SettingsDep, run_id: RunId, form: CheckedForm) -> Response:
    """The run page's *Merge* button (its script posts the form and follows the merge through
    GET /api/runs/{id}/merge)."""
    try:
        state, started = services.request_merge(session, settings, run_id)
    except services.NotFound as exc:
        return JSONResponse({"error": str(exc)}, 404)
    except services.Conflict as exc:
        return JSONResponse({"error": str(exc)}, 409)
    return JSONResponse({"status": state["status"]}, 202 if started else 200)


@router.post("/runs/{run_id}/range-sweep", response_model=None)
def range_test_sweep(request: Request, session: SessionDep, run_id: RunId, form: CheckedForm) -> Response:
    """The range test page's button: a sweep of five rates around its suggestion, then the sweep's page."""
    try:
        created = suggested_sweep(session, run_id)
    except services.NotFound:
        return not_found(request, f"Run {run_id}")
    except services.Conflict as exc:
        return render(request, "error.html", {"title": "No sweep started", "message": str(exc)}, 409)
    except ConfigError as exc:  # the test's config no longer fits (say, its uploaded dataset was deleted)
        return render(request, "error.html", {"title": "No sweep started", "message": str(exc)}, 422)
    return RedirectResponse(f"/sweeps/{created.id}", 303)


@router.post("/runs/{run_id}/resume", response_model=None)
def resume_run(request: Request, session: SessionDep, run_id: RunId, form: CheckedForm) -> Response:
    try:
        services.resume_run(session, run_id)
    except services.NotFound:
        return not_found(request, f"Run {run_id}")
    except services.Conflict as exc:
        return render(request, "error.html", {"title": "Cannot resume this run", "message": str(exc)}, 409)
    return RedirectResponse(f"/runs/{run_id}", 303)


@router.post("/runs/{run_id}/cancel", response_model=None)
def cancel_run(request: Request, session: SessionDep, run_id: RunId, form: CheckedForm) -> Response:
    try:
        services.cancel_run(session, run_id)
    except services.NotFound:
        return not_found(request, f"Run {run_id}")
    except services.Conflict:
        pass  # it finished meanwhile: its page says so
    return RedirectResponse(f"/runs/{run_id}", 303)


@router.post("/runs/{run_id}/delete", response_model=None)
def delete_run(
    request: Request, session: SessionDep, settings: SettingsDep, run_id: RunId, form: CheckedForm
) -> Response:
    try:
        services.delete_run(session, settings, run_id)
    except services.NotFound:
        return not_found(request, f"Run {run_id}")
    except services.Conflict as exc:
        return render(request, "error.html", {"title": "Cannot delete this run", "message": str(exc)}, 409)
    return RedirectResponse("/", 303)
