"""/api/runs: create, list, read, cancel and delete runs."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response, status
from sqlalchemy import ColumnElement, func
from sqlmodel import SQLModel, col, select

from app.deps import MAX_ID, RunId, SessionDep, SettingsDep
from app.jobs import NotFound, cancel_run, create_run, delete_run
from app.models import Run, RunPublic, RunStatus
from app.security import TokenDep
from trainer.config import TrainConfig

router = APIRouter(prefix="/api/runs", tags=["runs"], dependencies=[TokenDep])

SORTS = {
    "id": col(Run.id),
    "created_at": col(Run.created_at),
    "name": col(Run.name),
    "status": col(Run.status),
    "learning_rate": col(Run.learning_rate),
    "steps_done": col(Run.steps_done),
    "last_loss": col(Run.last_loss),
    "best_loss": col(Run.best_loss),
    "last_eval_loss": col(Run.last_eval_loss),
}
Sort = Literal[
    "id", "-id", "created_at", "-created_at", "name", "-name", "status", "-status", "learning_rate",
    "-learning_rate", "steps_done", "-steps_done", "last_loss", "-last_loss", "best_loss", "-best_loss",
    "last_eval_loss", "-last_eval_loss",
]  # fmt: skip


class RunsPublic(SQLModel):
    data: list[RunPublic]
    count: int
    """How many runs match the filters (all pages)."""


def get_run(session: SessionDep, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    return run


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunPublic)
def create(config: TrainConfig, session: SessionDep) -> Run:
    """Queue a training run. The body is the training config (every field optional)."""
    return create_run(session, config)


@router.get("", response_model=RunsPublic)
def list_runs(
    session: SessionDep,
    status: Annotated[list[RunStatus] | None, Query(description="Only runs in these statuses")] = None,
    sweep_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only the runs of this sweep")] = None,
    name: Annotated[str | None, Query(max_length=200, description="Only runs whose name contains this")] = None,
    sort: Annotated[Sort, Query(description="Sort key; a leading '-' sorts descending")] = "-id",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> RunsPublic:
    filters: list[ColumnElement[bool]] = []
    if status:
        filters.append(col(Run.status).in_(status))
    if sweep_id is not None:
        filters.append(col(Run.sweep_id) == sweep_id)
    if name:
        filters.append(col(Run.name).contains(name, autoescape=True))
    key = SORTS[sort.removeprefix("-")]
    order = key.desc() if sort.startswith("-") else key.asc()
    count = session.exec(select(func.count()).select_from(Run).where(*filters)).one()
    runs = session.exec(select(Run).where(*filters).order_by(order, col(Run.id).desc()).offset(offset).limit(limit))
    return RunsPublic(data=[RunPublic.model_validate(r) for r in runs], count=count)


@router.get("/{run_id}", response_model=RunPublic)
def read_run(run_id: RunId, session: SessionDep) -> Run:
    return get_run(session, run_id)


@router.post("/{run_id}/cancel", response_model=RunPublic)
def cancel(run_id: RunId, session: SessionDep) -> Run:
    """Cancel a queued or running run (409 if it already finished). A running job stops within seconds
    (SIGTERM, then SIGKILL after the grace period) and keeps the rows it recorded."""
    return cancel_run(session, run_id)


@router.delete("/{run_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete(run_id: RunId, session: SessionDep, settings: SettingsDep) -> Response:
    """Delete a finished run with its metric rows and files (409 while it is queued or running)."""
    delete_run(session, settings, run_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# The integrator adds GET /{run_id}/summary here: app.analysis.summarize_run(metrics.steps, metrics.series)
# over app.metrics.read_metrics(db, run_id, keys).
