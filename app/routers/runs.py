"""/api/runs: create, list, read, cancel and delete runs; their scores (one run, or all as CSV); their jobs' logs."""

from __future__ import annotations

import csv
import io
import sqlite3
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, func
from sqlmodel import SQLModel, select

from analysis.range_test import lr_range_suggestions
from analysis.runs import summarize_run
from app.deps import MAX_ID, DbDep, ExecutorReady, RunId, RunnerDep, SessionDep, SettingsDep
from app.runner.executor import DEFAULT_LOG_LINES
from app.runner.recovery import EXTERNAL
from app.security import TokenDep
from app.services import NotFound, cancel_run, create_run, delete_run, resume_run, runs_filter
from store.metrics import EVAL_KEY, read_metrics
from store.tables import FINISHED, Run, RunPublic, RunStatus
from trainer.config import TrainConfig

router = APIRouter(prefix="/api/runs", tags=["runs"], dependencies=[TokenDep])

Sort = Literal[
    "id", "-id", "created_at", "-created_at", "name", "-name", "status", "-status", "learning_rate",
    "-learning_rate", "steps_done", "-steps_done", "last_loss", "-last_loss", "best_loss", "-best_loss",
    "last_eval_loss", "-last_eval_loss",
]  # fmt: skip


class RunsPublic(SQLModel):
    data: list[RunPublic]
    count: int
    """How many runs match the filters (all pages)."""


class RangeTestSuggestions(BaseModel):
    """An lr range test's suggested rates (`analysis.range_test.lr_range_suggestions`); indices count recorded
    steps from 0."""

    model_config = ConfigDict(extra="allow")
    suggested_lr: float | None = Field(None, description="The valley rule's rate (else the steepest rule's)")
    valley_lr: float | None = Field(None, description="fastai's valley rule: in the longest fall of the smoothed loss")
    valley_index: int | None = None
    steepest_lr: float | None = Field(None, description="Where the smoothed loss falls fastest against log10(lr)")
    steepest_index: int | None = None
    min_loss_lr: float | None = Field(None, description="Where the smoothed loss is lowest (too high to train at)")
    min_loss_index: int | None = None
    stop_index: int | None = Field(None, description="Where the smoothed loss passed 4x its best (null: it never did)")
    sweep_lrs: list[float] = Field(default_factory=list, description="Five rates around the suggestion, for a sweep")
    smoothing_weight: float | None = None
    skip_start: int | None = Field(None, description="Leading steps left out of the suggestions")


MAX_LOG_LINES = 5000
"""The most lines of a job's log one request returns: a page's worth to read, not the whole file (a long run
logs a line per eval; the local file is in the run's folder, a Ray job's log is also on Ray's dashboard)."""


class JobOut(BaseModel):
    id: str
    status: str
    node: str | None
    url: str | None


class RunLogs(BaseModel):
    run_id: int
    executor: str
    """Where the job ran (`local` or `ray`), so where the lines come from: its stderr, or Ray's job log."""
    lines: list[str]
    """The last lines the run's latest job printed, oldest first (progress-bar redraws collapsed)."""
    job: JobOut | None = None
    """The latest job as the executor sees it (a Ray job: its id, status, node and dashboard page); None for a
    local subprocess (the run's own status and pid say it all) or when the cluster cannot say."""


Verdict = Literal["ok", "too_low", "too_high", "diverged", "inconclusive"]


class RunSummary(BaseModel):
    """A run's scores and learning-rate verdict (`analysis.runs.summarize_run`); the key scores are listed,
    the rest (rise_fraction, spike_steps, trend_*, ...) come along as further members."""

    model_config = ConfigDict(extra="allow")
    run_id: int
    status: RunStatus
    live: bool = Field(description="True while the run is going: computed now from the steps recorded so far")
    verdict: Verdict | None = Field(
        None, description="What the run says about the learning rate (null: too few steps to tell)"
    )
    reason: str = Field("", description="The verdict's reasons, in one sentence with the numbers")
    next_lrs: list[float] = Field(default_factory=list, description="The rates to try next, the most likely first")
    verdict_basis: Literal["run", "sweep"] = Field(
        "run", description="'sweep': judged against the other rates of its sweep; 'run': on its own steps' evidence"
    )
    solo_verdict: Verdict | None = Field(None, description="The verdict on the run's own steps' evidence")
    solo_reason: str | None = None
    grad_alignment_mean: float | None = Field(
        None, description="Mean cos(g_t, θ_{t−1} − θ_t) over the last two thirds: > 0 steps too short, < 0 overshot"
    )
    grad_alignment_t: float | None = Field(None, description="That mean in standard errors from zero")
    update_cos_mean: float | None = Field(None, description="Mean cos(Δθ_t, Δθ_{t−1}) over the last two thirds")
    final_eval_loss: float | None = Field(None, description="Smoothed eval loss at the last eval")
    n_steps: int | None = None
    final_loss: float | None = Field(None, description="Smoothed loss at the last step")
    best_loss: float | None = Field(None, description="Lowest smoothed loss")
    t90: int | None = Field(None, description="First step with 90% of the smoothed loss's net drop made")
    auc_norm: float | None = Field(None, description="Area above the best loss, normalised: 0 fast, 1 never fell")
    sign_change_rate: float | None = Field(None, description="Share of steps where the loss turns (oscillation)")
    tv_ratio: float | None = Field(None, description="Distance the raw loss travelled over its net drop (1: smooth)")
    spike_count: int | None = Field(None, description="Losses above mean + 6 std of the previous 128 steps")
    median_update_ratio: float | None = Field(None, description="Median of |dw| / |w| (practitioners aim near 1e-3)")
    median_step_scale: float | None = Field(None, description="Median of |dw| / (lr |g|): 1 for plain SGD")
    range_test: RangeTestSuggestions | None = Field(None, description="An lr range test's suggested rates")


SUMMARY_KEYS = ("loss", "lr", "grad_norm", "update_ratio", "step_scale", "grad_alignment", "update_cos")


def run_summary(db: sqlite3.Connection, run: Run) -> tuple[dict[str, Any], bool]:
    """(the run's analysis, whether it is live): the summary the trainer stored when the run ended, else one
    computed now from the recorded steps (a run still going, or one whose process was killed)."""
    assert run.id is not None
    finished = run.status in FINISHED
    if finished and run.summary is not None:
        return run.summary, False
    metrics = read_metrics(db, run.id, SUMMARY_KEYS)
    evals = read_metrics(db, run.id, [EVAL_KEY])
    summary = summarize_run(
        metrics.steps,
        metrics.series,
        status=run.status.value if finished else None,
        evals=(evals.steps, evals.series[EVAL_KEY]),
    )
    if run.kind == "lr_range_test":
        pairs = [(lr, loss) for lr, loss in zip(metrics.series["lr"], metrics.series["loss"], strict=True) if lr]
        summary["range_test"] = lr_range_suggestions([lr for lr, _ in pairs], [loss for _, loss in pairs])
    return summary, not finished


def get_run(session: SessionDep, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    return run


StatusFilter = Annotated[list[RunStatus] | None, Query(description="Only runs in these statuses")]
SweepFilter = Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only the runs of this sweep")]
NameFilter = Annotated[str | None, Query(max_length=200, description="Only runs whose name contains this")]
SortQuery = Annotated[Sort, Query(description="Sort key; a leading '-' sorts descending")]


def _filtered(
    status: list[RunStatus] | None, sweep_id: int | None, name: str | None, sort: str
) -> tuple[list[ColumnElement[bool]], list[Any]]:
    """The WHERE conditions and ORDER BY terms of the list's (and the CSV's) query parameters."""
    return runs_filter(status, sweep_id, name, sort.removeprefix("-"), descending=sort.startswith("-"))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunPublic, dependencies=[ExecutorReady])
def create(config: TrainConfig, session: SessionDep) -> Run:
    """Queue a training run. The body is the training config (every field optional)."""
    return create_run(session, config)


@router.get("", response_model=RunsPublic)
def list_runs(
    session: SessionDep,
    status: StatusFilter = None,
    sweep_id: SweepFilter = None,
    name: NameFilter = None,
    sort: SortQuery = "-id",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> RunsPublic:
    """Runs with their settings, progress and, once they end, their scores (`summary`) and `verdict`."""
    filters, order = _filtered(status, sweep_id, name, sort)
    count = session.exec(select(func.count()).select_from(Run).where(*filters)).one()
    runs = session.exec(select(Run).where(*filters).order_by(*order).offset(offset).limit(limit))
    return RunsPublic(data=[RunPublic.model_validate(r) for r in runs], count=count)


CSV_RUN_COLUMNS = (
    "id", "name", "kind", "status", "model", "dataset", "learning_rate", "batch_size", "optimizer", "steps_done",
)  # fmt: skip
CSV_SCORE_COLUMNS = (
    "final_loss", "best_loss", "final_eval_loss", "t90", "auc_norm", "sign_change_rate", "tv_ratio", "spike_count",
    "median_update_ratio", "median_step_scale", "grad_alignment_mean", "update_cos_mean", "verdict", "reason",
    "next_lrs",
)  # fmt: skip


class CSVResponse(Response):
    media_type = "text/csv"


# Declared before /{run_id} (which could not match it anyway: no slash), like every fixed path here.
@router.get(
    ".csv",
    response_class=CSVResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "One row per run: its settings and scores"}},
)
def runs_csv(
    session: SessionDep,
    db: DbDep,
    status: StatusFilter = None,
    sweep_id: SweepFilter = None,
    name: NameFilter = None,
    sort: SortQuery = "-id",
) -> CSVResponse:
    """Every run matching the filters, one row each: id, name, kind, status, model, dataset, learning_rate,
    batch_size, optimizer, steps_done, then the scores (final_loss and best_loss are smoothed), verdict
    and reason. Scores are the analysis stored when a run ended; for a run still going they are computed
    now from its recorded steps; empty where there are none."""
    filters, order = _filtered(status, sweep_id, name, sort)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow((*CSV_RUN_COLUMNS, *CSV_SCORE_COLUMNS))
    for run in session.exec(select(Run).where(*filters).order_by(*order)):
        summary = run_summary(db, run)[0] if run.summary is not None or run.status == RunStatus.running else {}
        summary = {**summary, **judged_in_sweep(summary)}
        values = [getattr(run, c) for c in CSV_RUN_COLUMNS]
        scores = (summary.get(c) for c in CSV_SCORE_COLUMNS)
        writer.writerow([*values, *(" ".join(map(str, v)) if isinstance(v, list) else v for v in scores)])
    headers = {"Content-Disposition": 'attachment; filename="runs.csv"'}
    return CSVResponse(buffer.getvalue(), headers=headers)


@router.get("/{run_id}", response_model=RunPublic)
def read_run(run_id: RunId, session: SessionDep) -> Run:
    return get_run(session, run_id)


@router.get("/{run_id}/summary", response_model=RunSummary)
def read_summary(run_id: RunId, session: SessionDep, db: DbDep) -> dict[str, Any]:
    """The run's scores and verdict: those stored when it ended, or, while it is queued or running,
    computed now from the steps recorded so far (`live` is then true). An lr range test's answer also
    holds its suggested rates (`range_test`)."""
    run = get_run(session, run_id)
    summary, live = run_summary(db, run)
    return {**summary, **judged_in_sweep(summary), "run_id": run_id, "status": run.status, "live": live}


def judged_in_sweep(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's verdict against its sweep's other rates, where one was stored (`app.services.judge_sweep`),
    with its own verdict beside it; nothing where the run was judged alone."""
    compared = summary.get("comparative")
    if not compared:
        return {}
    return {
        "verdict": compared["verdict"],
        "reason": compared["reason"],
        "next_lrs": compared["next_lrs"],
        "verdict_basis": "sweep",
        "solo_verdict": summary.get("verdict"),
        "solo_reason": summary.get("reason"),
    }


@router.get("/{run_id}/logs", response_model=RunLogs)
def read_logs(
    run_id: RunId,
    session: SessionDep,
    runner: RunnerDep,
    settings: SettingsDep,
    tail: Annotated[int, Query(ge=1, le=MAX_LOG_LINES, description="How many of the last lines")] = DEFAULT_LOG_LINES,
) -> RunLogs:
    """The end of the log of the run's latest job, through the executor: the local job's stderr or the Ray
    job's log (`get_job_logs`). None for a run recorded by a script of its own, or one not started yet."""
    run = get_run(session, run_id)
    if run.kind == EXTERNAL:
        return RunLogs(run_id=run_id, executor=settings.executor, lines=[])
    lines = runner.executor.logs(run_id, tail)
    job = runner.executor.job_info(run_id)
    return RunLogs(run_id=run_id, executor=settings.executor, lines=lines, job=JobOut(**asdict(job)) if job else None)


@router.post("/{run_id}/resume", response_model=RunPublic)
def resume(run_id: RunId, session: SessionDep) -> Run:
    """Continue an interrupted run (a server shutdown or a crash stopped it) from its last checkpoint, with
    the same step numbering; 409 unless it is interrupted."""
    return resume_run(session, run_id)


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
