"""The ingest API: runs recorded by a script outside the server (`import stepscope`, the HF Trainer callback).

Why a path of its own (`POST /api/external-runs`) rather than a `source` member in `POST /api/runs`: the body
of `POST /api/runs` is the engine's training config, checked strictly (a misspelt field is a 422, a model
must exist), and it queues a job. An external run is the opposite on both counts: its config is free-form
(whatever the script's hyperparameters are) and nothing is queued, the script is already training. One body
for both would make either the built-in one loose or the external one's 422s talk about fields it never
had. Everything after creation is shared with built-in runs: `/api/runs/{id}`, its metrics, pages, compare.

Rows are idempotent on (run, step): a client that retries a batch (or replays its spool after the server
was down) replaces rows with the same values, never adds them (`store.rollups.write_steps` and
`store.scalars.write_scalars` both INSERT OR REPLACE). Every batch is also the client's heartbeat: an
external run whose client stays silent longer than its `heartbeat_seconds` is marked `interrupted` by
the job runner (`app.runner.recovery.settle_if_silent`), so a killed script does not stay `running`.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Response, status
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from app.deps import MAX_ID, DbDep, RunId, SessionDep
from app.routers.runs import get_run, run_summary
from app.runner.recovery import EXTERNAL
from app.security import TokenDep
from app.services import Conflict, NotFound
from store.landscape import MODULE_INSERT, PROBE_INSERT, module_values, probe_values
from store.metrics import METRIC_KEYS
from store.rollups import write_steps
from store.scalars import KEY_PATTERN, scalar_keys, write_scalars
from store.tables import STEP_COLUMNS, Run, RunPublic, RunStatus, sqlite_time, utcnow

router = APIRouter(tags=["ingest"], dependencies=[TokenDep])

MAX_ROWS = 10_000
"""Rows per request (steps or evals); a client sends about a second's worth at a time."""
MAX_KEYS_PER_ROW = 256
EVAL_INSERT = "INSERT OR REPLACE INTO eval_metrics (run_id, step, eval_loss, wall_time) VALUES (?, ?, ?, ?)"
Finite = Field(None, allow_inf_nan=False)


class ExternalRunCreate(BaseModel):
    """A run that a script records itself. Only `name` matters to the dashboard; the rest is shown as given."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=200)
    source: str = Field("script", max_length=100, description="What records it, e.g. 'script' or 'hf-trainer'")
    config: dict[str, Any] = Field(default_factory=dict, description="Free-form hyperparameters, stored as given")
    learning_rate: float | None = Field(None, gt=0, allow_inf_nan=False)
    model: str = Field("", max_length=500)
    dataset: str = Field("", max_length=500)
    batch_size: int | None = Field(None, ge=1, le=MAX_ID)
    optimizer: str = Field("", max_length=100)
    heartbeat_seconds: float = Field(
        60, ge=1, le=86_400, description="Silence after which the run is marked interrupted (the script died)"
    )

    @field_validator("config")
    @classmethod
    def _json_safe(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not _finite_json(value):
            raise ValueError("config may hold only finite numbers (JSON has no NaN or Infinity)")
        return value


def _finite_json(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_json(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_json(v) for v in value)
    return True


class StepRow(BaseModel):
    """One optimizer step: the standard columns it has (the rest stay null) and any other scalars by name.

    `loss` and `grad_norm` may be non-finite (a diverging run, an fp16 overflow); the others must be finite.
    """

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float | None] = Field(init=False)
    step: int = Field(ge=0, le=MAX_ID)
    epoch: float | None = Field(None, ge=0, allow_inf_nan=False)
    samples: int | None = Field(None, ge=0, le=MAX_ID)
    tokens: int | None = Field(None, ge=0, le=MAX_ID)
    loss: float | None = None
    lr: float | None = Field(None, ge=0, allow_inf_nan=False)
    grad_norm: float | None = None
    update_norm: float | None = Finite
    param_norm: float | None = Finite
    update_ratio: float | None = Finite
    step_scale: float | None = Finite
    wall_time: float | None = Finite
    step_time: float | None = Finite
    update_cos: float | None = Finite
    grad_alignment: float | None = Finite
    skipped: int | None = Field(None, ge=0, le=1)


class StepsIn(BaseModel):
    rows: list[StepRow] = Field(max_length=MAX_ROWS)


class EvalRow(BaseModel):
    """One evaluation: its step, the eval loss (may be non-finite) and any other scalars by name."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float | None] = Field(init=False)
    step: int = Field(ge=0, le=MAX_ID)
    eval_loss: float | None = None
    wall_time: float | None = Field(None, ge=0, allow_inf_nan=False)


class EvalsIn(BaseModel):
    rows: list[EvalRow] = Field(max_length=MAX_ROWS)


class Written(BaseModel):
    run_id: int
    rows: int
    steps_done: int


Ending = Literal["completed", "failed", "cancelled", "interrupted", "diverged"]


class FinishIn(BaseModel):
    status: Ending = "completed"
    error: str | None = Field(None, max_length=10_000)


class MetricKeys(BaseModel):
    standard: list[str] = Field(description="The standard columns (and eval_loss), recorded for every run")
    custom: list[str] = Field(description="Other scalars this run recorded")


def _unprocessable(loc: list[str | int], message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"loc": ["body", *loc], "msg": message, "type": "value_error"}]
    )


def _extras(row: BaseModel, where: list[str | int], reserved: set[str]) -> list[tuple[str, float | None]]:
    """A row's other scalars, checked: a key name of KEY_PATTERN, a finite number (or null)."""
    extra = row.model_extra or {}
    if len(extra) > MAX_KEYS_PER_ROW:
        raise _unprocessable(where, f"at most {MAX_KEYS_PER_ROW} metrics a row")
    out = []
    for key, value in extra.items():
        if key in reserved or not KEY_PATTERN.fullmatch(key):
            message = f"not a metric name (nor a standard one): letters, digits and _ . / : - ({KEY_PATTERN.pattern})"
            raise _unprocessable([*where, key], message)
        if value is not None and not math.isfinite(value):
            raise _unprocessable([*where, key], "must be a finite number or null")
        out.append((key, value))
    return out


def _claim(db: sqlite3.Connection, run_id: int) -> None:
    """Begin the write: refresh the heartbeat of the run if it is an external run still going, else 404/409.

    The UPDATE comes first, so the transaction holds SQLite's write lock from the check on: a `finish`
    cannot slip in between the check and the rows.
    """
    # A built-in run's own job may record through here too (the engine's HTTP recorder, a job on a Ray worker).
    sql = "UPDATE runs SET heartbeat_at = ? WHERE id = ? AND status = ?"
    if db.execute(sql, (sqlite_time(utcnow()), run_id, RunStatus.running.value)).rowcount == 1:
        return
    db.rollback()
    row = db.execute("SELECT kind, status FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise NotFound(f"no run with id {run_id}")
    if row[0] != EXTERNAL and row[1] == RunStatus.queued.value:
        raise Conflict(f"run {run_id} is a built-in run that has not started: its own job records it")
    raise Conflict(f"run {run_id} already finished ({row[1]})")


def _commit(db: sqlite3.Connection, write: Any) -> None:
    try:
        write()
        db.commit()
    except BaseException:
        db.rollback()
        raise


@router.post("/api/external-runs", status_code=status.HTTP_201_CREATED, response_model=RunPublic)
def create_external_run(body: ExternalRunCreate, session: SessionDep) -> Run:
    """Start recording a run that a script trains itself: status `running`, kind `external`. The script then
    sends its rows to `/api/runs/{id}/steps` and `/evals` and ends it with `/finish`."""
    now = utcnow()
    run = Run(
        name=body.name,
        kind=EXTERNAL,
        status=RunStatus.running,
        model=body.model,
        dataset=body.dataset,
        learning_rate=body.learning_rate or 0.0,
        batch_size=body.batch_size or 0,
        optimizer=body.optimizer,
        config={**body.config, "stepscope_source": body.source},
        started_at=now,
        heartbeat_at=now,
        heartbeat_seconds=body.heartbeat_seconds,
    )
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


@router.post("/api/runs/{run_id}/steps", response_model=Written)
def add_steps(run_id: RunId, body: StepsIn, db: DbDep) -> Written:
    """Record a batch of steps. A step sent again keeps the values it had where the new row has none (a
    script may log a step's metrics in several calls), so a retried batch changes nothing: idempotent."""
    record_steps(db, run_id, body.rows)
    return Written(run_id=run_id, rows=len(body.rows), steps_done=_steps_done(db, run_id))


def record_steps(db: sqlite3.Connection, run_id: int, step_rows: list[StepRow]) -> None:
    """Write checked step rows of a running run in one transaction (also the Trackio-compatible endpoint's)."""
    reserved = {"step", *METRIC_KEYS}
    by_step: dict[int, list[Any]] = {}
    custom = []
    for i, row in enumerate(step_rows):
        values = [getattr(row, c) for c in STEP_COLUMNS]
        before = by_step.get(row.step)
        by_step[row.step] = values if before is None else _merged(values, before)
        custom += [(key, row.step, value) for key, value in _extras(row, ["rows", i], reserved)]
    _claim(db, run_id)

    def write() -> None:
        stored = _stored_rows(db, run_id, list(by_step))
        rows = [
            (run_id, step, *(_merged(values, stored[step]) if step in stored else values))
            for step, values in sorted(by_step.items())
        ]
        write_steps(db, run_id, rows)
        write_scalars(db, run_id, custom)
        _update_progress(db, run_id, step_rows)

    _commit(db, write)


def _merged(new: list[Any], old: Sequence[Any]) -> list[Any]:
    return [o if n is None else n for n, o in zip(new, old, strict=True)]


def _stored_rows(db: sqlite3.Connection, run_id: int, steps: list[int]) -> dict[int, tuple[Any, ...]]:
    """The standard columns already stored at these steps (a primary-key lookup each)."""
    sql = (
        f"SELECT step, {', '.join(STEP_COLUMNS)} FROM step_metrics "
        "WHERE run_id = ? AND step IN (SELECT value FROM json_each(?))"
    )
    return {row[0]: row[1:] for row in db.execute(sql, (run_id, json.dumps(steps)))}


def _update_progress(db: sqlite3.Connection, run_id: int, rows: list[StepRow]) -> None:
    """The run's summary numbers (steps_done, last_loss, best_loss) as the built-in trainer keeps them."""
    if not rows:
        return
    # A row with other scalars only (say, accuracy at a step whose loss came before) says nothing of the loss.
    with_loss = [r for r in rows if r.loss is not None] or rows
    last = max(with_loss, key=lambda r: r.step)
    losses = [r.loss for r in rows if r.loss is not None and math.isfinite(r.loss)]
    db.execute(
        "UPDATE runs SET last_loss = CASE WHEN ? AND ? >= steps_done THEN ? ELSE last_loss END, "
        "best_loss = CASE WHEN ? IS NULL THEN best_loss WHEN best_loss IS NULL OR ? < best_loss THEN ? "
        "ELSE best_loss END, steps_done = max(steps_done, ?) WHERE id = ?",
        (last.loss is not None, last.step, last.loss, *([min(losses)] * 3 if losses else [None] * 3),
         max(r.step for r in rows), run_id),
    )  # fmt: skip


def _steps_done(db: sqlite3.Connection, run_id: int) -> int:
    return int(db.execute("SELECT steps_done FROM runs WHERE id = ?", (run_id,)).fetchone()[0])


@router.post("/api/runs/{run_id}/evals", response_model=Written)
def add_evals(run_id: RunId, body: EvalsIn, db: DbDep) -> Written:
    """Record a batch of evaluations (idempotent on (run, step)); other scalars go with the custom keys."""
    record_evals(db, run_id, body.rows)
    return Written(run_id=run_id, rows=len(body.rows), steps_done=_steps_done(db, run_id))


def record_evals(db: sqlite3.Connection, run_id: int, eval_rows: list[EvalRow]) -> None:
    """Write checked eval rows of a running run in one transaction (also the Trackio-compatible endpoint's)."""
    reserved = {"step", "wall_time", *METRIC_KEYS}
    custom = [
        (key, row.step, value) for i, row in enumerate(eval_rows) for key, value in _extras(row, ["rows", i], reserved)
    ]
    _claim(db, run_id)
    # eval_metrics.wall_time is required: without the script's own, the seconds since the run started.
    started = db.execute("SELECT julianday(started_at) FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    received = 0.0 if started is None else max(0.0, (_julian_now(db) - started) * 86_400)
    evals = [(run_id, r.step, r.eval_loss, r.wall_time if r.wall_time is not None else received) for r in eval_rows]

    def write() -> None:
        db.executemany(EVAL_INSERT, evals)
        write_scalars(db, run_id, custom)
        finite = [e for e in evals if e[2] is not None and math.isfinite(e[2])]
        if finite:
            last = max(finite, key=lambda e: e[1])
            db.execute("UPDATE runs SET last_eval_loss = ? WHERE id = ?", (last[2], run_id))

    _commit(db, write)


class ProbeIn(BaseModel):
    """One step's cross-section (trainer.landscape): the probe loss at each α times the step."""

    step: int = Field(ge=1, le=MAX_ID)
    alphas: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(min_length=3, max_length=64)
    losses: list[Annotated[float, Field(allow_inf_nan=False)] | None] = Field(min_length=3, max_length=64)
    best_alpha: float | None = Finite

    @field_validator("losses")
    @classmethod
    def _one_per_alpha(cls, value: list[float | None], info: ValidationInfo) -> list[float | None]:
        if len(value) != len(info.data.get("alphas", value)):
            raise ValueError("must hold one loss per alpha")
        return value


class ModuleNormsIn(BaseModel):
    """Per LoRA tensor (in the order of the run's `lora_tensors`), its update and weight norm at one step."""

    step: int = Field(ge=1, le=MAX_ID)
    update_norms: list[Annotated[float, Field(ge=0, allow_inf_nan=False)] | None] = Field(max_length=100_000)
    param_norms: list[Annotated[float, Field(ge=0, allow_inf_nan=False)] | None] = Field(max_length=100_000)

    @field_validator("param_norms")
    @classmethod
    def _one_per_tensor(cls, value: list[float | None], info: ValidationInfo) -> list[float | None]:
        if len(value) != len(info.data.get("update_norms", value)):
            raise ValueError("must hold one norm per tensor, as update_norms does")
        return value


class ProbesIn(BaseModel):
    rows: list[ProbeIn] = Field(max_length=MAX_ROWS)


class ModuleNormsBatch(BaseModel):
    rows: list[ModuleNormsIn] = Field(max_length=MAX_ROWS)


@router.post("/api/runs/{run_id}/probes", response_model=Written)
def add_probes(run_id: RunId, body: ProbesIn, db: DbDep) -> Written:
    """Record probe curves of a running run (the engine's HTTP recorder sends them); idempotent on the step."""
    _claim(db, run_id)
    rows = [(r.step, r.alphas, r.losses, r.best_alpha) for r in body.rows]
    _commit(db, lambda: db.executemany(PROBE_INSERT, probe_values(run_id, rows)))
    return Written(run_id=run_id, rows=len(rows), steps_done=_steps_done(db, run_id))


@router.post("/api/runs/{run_id}/module-norms", response_model=Written)
def add_module_norms(run_id: RunId, body: ModuleNormsBatch, db: DbDep) -> Written:
    """Record per-tensor norms of a running run (the engine's HTTP recorder sends them); idempotent on the step."""
    _claim(db, run_id)
    rows = [(r.step, r.update_norms, r.param_norms) for r in body.rows]
    _commit(db, lambda: db.executemany(MODULE_INSERT, module_values(run_id, rows)))
    return Written(run_id=run_id, rows=len(rows), steps_done=_steps_done(db, run_id))


def _julian_now(db: sqlite3.Connection) -> float:
    return float(db.execute("SELECT julianday(?)", (sqlite_time(utcnow()),)).fetchone()[0])


@router.post("/api/runs/{run_id}/heartbeat", status_code=status.HTTP_204_NO_CONTENT)
def heartbeat(run_id: RunId, db: DbDep) -> Response:
    """The client is alive (it sends this when it has no rows to send)."""
    _claim(db, run_id)
    db.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/api/runs/{run_id}/finish", response_model=RunPublic)
def finish(run_id: RunId, body: FinishIn, session: SessionDep, db: DbDep) -> Run:
    """End an external run with its status; its scores and verdict are computed from the recorded rows and
    stored, as the built-in trainer stores them (409 if it already ended)."""
    run = get_run(session, run_id)
    if run.kind != EXTERNAL:
        raise Conflict(f"run {run_id} is a built-in run: its own job records it")
    if run.status != RunStatus.running:
        raise Conflict(f"run {run_id} already finished ({run.status.value})")
    run.status = RunStatus(body.status)
    run.summary = None
    summary, _ = run_summary(db, run)
    run.summary, run.verdict = summary, summary.get("verdict")
    run.error, run.finished_at = body.error, utcnow()
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


@router.get("/api/runs/{run_id}/metric-keys", response_model=MetricKeys)
def metric_keys(run_id: RunId, session: SessionDep, db: DbDep) -> MetricKeys:
    """The keys `GET /api/runs/{id}/metrics?keys=` takes for this run: the standard ones and its own."""
    get_run(session, run_id)
    return MetricKeys(standard=list(METRIC_KEYS), custom=scalar_keys(db, run_id))


JOB_COLUMNS = frozenset(
    {"status", "started_at", "finished_at", "device", "pid", "pid_start", "error", "error_step", "n_train", "n_eval",
     "updates_per_epoch", "total_steps", "trainable_params", "total_params", "steps_done", "last_loss",
     "best_loss", "last_eval_loss", "summary", "verdict", "lora_tensors"}
)  # fmt: skip
"""The columns of a built-in run that its own job writes (trainer.recorder.Recorder.update_run)."""


class JobFields(BaseModel):
    fields: dict[str, Any] = Field(description="Columns of the run's row: its plan, progress, status and summary")


@router.post("/api/runs/{run_id}/job", response_model=RunPublic)
def update_job_run(run_id: RunId, body: JobFields, session: SessionDep) -> Run:
    """What a built-in run's job records about its run (the engine's HTTP recorder, `python -m trainer --server`):
    the columns `Recorder.update_run` sets locally, each checked against its column's type. Only while the run
    is queued or running (409 once it ended: a job the runner already settled does not reopen its run)."""
    run = get_run(session, run_id)
    if run.kind == EXTERNAL:
        raise Conflict(f"run {run_id} is an external run: it ends through /finish")
    if run.status not in (RunStatus.queued, RunStatus.running):
        raise Conflict(f"run {run_id} already finished ({run.status.value})")
    for name, value in body.fields.items():
        if name not in JOB_COLUMNS:
            raise _unprocessable(["fields", name], f"not a column a job writes ({', '.join(sorted(JOB_COLUMNS))})")
        try:
            checked = TypeAdapter(Run.model_fields[name].annotation or Any).validate_python(value)
        except ValidationError as exc:
            raise _unprocessable(["fields", name], exc.errors()[0]["msg"]) from None
        if isinstance(checked, float) and not math.isfinite(checked) and name not in ("last_loss", "best_loss"):
            raise _unprocessable(["fields", name], "must be a finite number")
        if isinstance(checked, int) and not isinstance(checked, bool) and not 0 <= checked <= MAX_ID:
            raise _unprocessable(["fields", name], f"must be between 0 and {MAX_ID}")
        if name == "summary" and checked is not None and not _finite_json(checked):
            raise _unprocessable(["fields", name], "may hold only finite numbers")
        setattr(run, name, checked)
    session.add(run)
    session.commit()
    session.refresh(run)
    return run
