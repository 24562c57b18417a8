"""Trackio's self-hosted server protocol, so a script that logs with `trackio` records into stepscope unchanged.

Set `TRACKIO_SERVER_URL` to this server's address and `TRACKIO_WRITE_TOKEN` (any text without
STEPSCOPE_TOKEN; the token itself with one), and `trackio.init/log/finish`, or `report_to="trackio"` in a
Hugging Face `Trainer`, send here. The protocol is Trackio's plain HTTP one (trackio>=0.43,
trackio/remote_client.py): `GET /version` must say `api_version` 1, then every call is `POST /api/<name>`
with `{"args": [...], "kwargs": {...}}`, answered `{"data": ...}`. A client that finds no `api_version` 1
falls back to Gradio's queue protocol, which stepscope does not speak.

Answered: `bulk_log` (the metrics), `bulk_log_system` (CPU/GPU samples by time: not stored, they only
show that the script is alive) and `get_runs_for_project`. Every `trackio.init` is a run of its own here,
so that call answers that there is no run to resume. Calls for media, tables, alerts and artifacts get
404; the client keeps those locally and training goes on.

Each Trackio run (project, run id) becomes an external run (`app.routers.ingest`), written through the
same checked, idempotent path (a batch the client sends again changes nothing). A metric's step is the
Trainer's `train/global_step` when logged (the optimizer step; Trackio's own step counts log calls),
else Trackio's step. `loss`, `learning_rate`, `grad_norm` and `epoch` (plain or `train/`) and any
standard column by name fill the standard columns, `eval/loss` the eval loss, and any other finite
number is a custom metric; text, media and non-finite custom values are left out. Trackio has no call
that ends a run, so a run ends `completed` when its client has been silent for its heartbeat interval
(`app.runner.recovery.settle_if_silent`), and is `running` again if it speaks after all.
"""

from __future__ import annotations

import math
import sqlite3
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.deps import MAX_ID, DbDep, SessionDep
from app.routers.ingest import EvalRow, StepRow, record_evals, record_steps
from app.runner.recovery import EXTERNAL, TRACKIO_SOURCE
from app.security import TrackioTokenDep
from store.metrics import EVAL_KEY
from store.scalars import KEY_PATTERN
from store.tables import STEP_COLUMNS, Run, RunStatus, sqlite_time, utcnow

router = APIRouter(tags=["trackio"], dependencies=[TrackioTokenDep])

TRACKIO_API_VERSION = 1
"""The protocol version Trackio's client asks `/version` for (HTTP_API_VERSION in trackio/remote_client.py)."""
GLOBAL_STEP = "train/global_step"
"""What transformers' TrackioCallback logs as the optimizer step next to each log."""
STANDARD = {"learning_rate": "lr", "eval/loss": "eval_loss", EVAL_KEY: EVAL_KEY} | {c: c for c in STEP_COLUMNS}
"""Trackio's names of stepscope's columns; each may also carry the Trainer's `train/` prefix."""
SILENCE_SECONDS = 60.0
"""Silence that ends a Trackio run: the external runs' default heartbeat. The client sends about every
0.5 s while there is something to send, and samples CPU/GPU every 10 s when psutil is installed."""
MAX_LOGS = 100_000
"""Entries a call: a client back from an outage sends all it kept at once (the body size limit holds too)."""


class TrackioLog(BaseModel):
    """One `trackio.log` call as the client sends it (trackio's LogEntry); newer members are ignored."""

    model_config = ConfigDict(extra="ignore")
    project: str = Field(max_length=200)
    run: str = Field(max_length=200)
    run_id: str | None = Field(None, max_length=200)
    metrics: dict[str, Any] = Field(default_factory=dict)
    step: int | None = Field(None, ge=0, le=MAX_ID)
    config: dict[str, Any] | None = None


class TrackioCall(BaseModel):
    """A call's body: `{"args": [...], "kwargs": {...}}`, each subclass naming its kwargs."""

    # Named apart from their JSON names (and populated by name too): pydantic's mypy plugin would otherwise
    # give __init__ a `kwargs` parameter beside its own **kwargs.
    model_config = ConfigDict(populate_by_name=True)
    call_args: list[Any] = Field(
        default_factory=list, alias="args", max_length=0, description="Trackio sends keyword arguments only"
    )


class BulkLogArgs(BaseModel):
    model_config = ConfigDict(extra="ignore")
    logs: list[TrackioLog] = Field(max_length=MAX_LOGS)


class BulkLogCall(TrackioCall):
    call_kwargs: BulkLogArgs = Field(alias="kwargs")


class ProjectArgs(BaseModel):
    model_config = ConfigDict(extra="ignore")
    project: str = Field(max_length=200)


class ProjectCall(TrackioCall):
    call_kwargs: ProjectArgs = Field(alias="kwargs")


class Answer(BaseModel):
    data: Any = None


class Version(BaseModel):
    version: str
    api_version: int
    api_transport: str
    writes_paused: bool


@router.get("/version", response_model=Version)
def version() -> Version:
    """What Trackio's client checks first: the HTTP protocol version it speaks."""
    return Version(version="stepscope", api_version=TRACKIO_API_VERSION, api_transport="http", writes_paused=False)


@router.post("/api/bulk_log", response_model=Answer)
def bulk_log(body: BulkLogCall, session: SessionDep, db: DbDep) -> Answer:
    """A batch of `trackio.log` calls, of one or more runs: each run's steps and evals in one write."""
    by_run: dict[tuple[str, str], list[TrackioLog]] = {}
    for entry in body.call_kwargs.logs:
        by_run.setdefault((entry.project, entry.run_id or entry.run), []).append(entry)
    for (project, trackio_id), entries in by_run.items():
        steps: list[StepRow] = []
        evals: list[EvalRow] = []
        for entry in entries:
            step_row, eval_row = _rows(entry)
            if step_row is not None:
                steps.append(step_row)
            if eval_row is not None:
                evals.append(eval_row)
        run_id = _run_for(session, db, project, trackio_id, entries)
        record_steps(db, run_id, steps)
        if evals:
            record_evals(db, run_id, evals)
    return Answer()


@router.post("/api/bulk_log_system", response_model=Answer)
def bulk_log_system(body: BulkLogCall, db: DbDep) -> Answer:
    """System samples (CPU, GPU, by time): not stored, but a sign that their runs' scripts are alive."""
    now = sqlite_time(utcnow())
    for project, trackio_id in {(e.project, e.run_id or e.run) for e in body.call_kwargs.logs}:
        found = _find(db, project, trackio_id)
        if found is not None and found[1] == RunStatus.running.value:
            db.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ? AND status = ?", (now, found[0], found[1]))
    db.commit()
    return Answer()


@router.post("/api/get_runs_for_project", response_model=Answer)
def get_runs_for_project(body: ProjectCall) -> Answer:
    """No run to resume: every `trackio.init` is a new run here (see the module's docstring)."""
    return Answer(data=[])


def _rows(entry: TrackioLog) -> tuple[StepRow | None, EvalRow | None]:
    """The step row and the eval row (either may be None) of one logged dict."""
    global_step = entry.metrics.get(GLOBAL_STEP)
    step = global_step if type(global_step) is int and 0 <= global_step <= MAX_ID else entry.step
    if step is None:
        return None, None
    train: dict[str, float] = {}
    evals: dict[str, float] = {}
    for key, value in entry.metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or key == GLOBAL_STEP:
            continue  # text, media, tables, histograms: not scalars
        try:
            value = float(value)
        except OverflowError:  # an int beyond any float
            continue
        name = key.removeprefix("train/")
        column = STANDARD.get(name)
        if column == EVAL_KEY:
            evals[column] = value
        elif column is not None:
            train[column] = value
        elif key != "step" and KEY_PATTERN.fullmatch(key) and math.isfinite(value):  # step: the row's own
            (evals if key.startswith("eval/") else train)[key] = value
    return _checked(StepRow, step, train), _checked(EvalRow, step, evals) if evals else None


def _checked(model: type[StepRow] | type[EvalRow], step: int, values: dict[str, float]) -> Any:
    """The row, leaving out a value its column refuses (a negative lr, a non-finite epoch): a Trackio
    client cannot be told which one was wrong, and a 422 would only make it keep the batch and resend it."""
    try:
        return model.model_validate({"step": step, **values})
    except ValidationError as exc:
        refused = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        return model.model_validate({"step": step, **{k: v for k, v in values.items() if k not in refused}})


def _find(db: sqlite3.Connection, project: str, trackio_id: str) -> tuple[int, str] | None:
    sql = (
        "SELECT id, status FROM runs WHERE kind = ? AND json_extract(config, '$.stepscope_source') = ? "
        "AND json_extract(config, '$.trackio_project') = ? AND json_extract(config, '$.trackio_run_id') = ?"
    )
    row = db.execute(sql, (EXTERNAL, TRACKIO_SOURCE, project, trackio_id)).fetchone()
    db.rollback()  # end the read, so that the writes that follow start their own transactions
    return None if row is None else (int(row[0]), str(row[1]))


def _run_for(
    session: SessionDep, db: sqlite3.Connection, project: str, trackio_id: str, entries: list[TrackioLog]
) -> int:
    """The stepscope run of a Trackio run: created at its first batch; running again if silence ended it.

    Trackio's client sends from one thread, one batch at a time, so two first batches of a run do not race.
    """
    found = _find(db, project, trackio_id)
    if found is not None:
        if found[1] == RunStatus.completed.value:  # only silence completes a Trackio run (no call ends one)
            sql = "UPDATE runs SET status = ?, finished_at = NULL, summary = NULL, verdict = NULL WHERE id = ?"
            db.execute(sql, (RunStatus.running.value, found[0]))
            db.commit()
        return found[0]
    config = next((e.config for e in entries if e.config), None) or {}
    now = utcnow()
    run = Run(
        name=entries[0].run,
        kind=EXTERNAL,
        status=RunStatus.running,
        model=_text(config, "_name_or_path", "model_name_or_path", "model"),
        learning_rate=_positive(config, "learning_rate", "lr") or 0.0,
        batch_size=int(_positive(config, "per_device_train_batch_size", "batch_size") or 0),
        config={**_finite(config), "stepscope_source": TRACKIO_SOURCE, "trackio_project": project,
                "trackio_run_id": trackio_id},
        started_at=now,
        heartbeat_at=now,
        heartbeat_seconds=SILENCE_SECONDS,
    )  # fmt: skip
    session.add(run)
    session.commit()
    assert run.id is not None
    return run.id


def _text(config: dict[str, Any], *keys: str) -> str:
    return next((v[:500] for k in keys if isinstance(v := config.get(k), str)), "")


def _positive(config: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = config.get(key)
        if not isinstance(value, bool) and isinstance(value, int | float) and 0 < value <= MAX_ID:
            return float(value)
    return None


def _finite(value: Any) -> Any:
    """The config as JSON can store it: a non-finite number becomes text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
