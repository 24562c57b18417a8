"""Metric series of runs: JSON (whole or downsampled), CSV, a live event stream, and several runs at once."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from analysis.smoothing import DebiasedEma, ema_smooth
from app.deps import MAX_ID, DbDep, EngineDep, RunId
from app.security import TokenDep
from app.services import NotFound
from store.metrics import (
    METRIC_KEYS,
    UnknownKeys,
    compare_json,
    iter_csv,
    metrics_json,
    new_rows,
    parse_keys,
    read_metrics,
)
from store.scalars import scalar_keys
from store.tables import FINISHED, Run, RunPublic

router = APIRouter(prefix="/api", tags=["metrics"], dependencies=[TokenDep])

EVENT_POLL_SECONDS = 0.25
EVENT_BATCH_ROWS = 5000
KEEPALIVE_SECONDS = 15.0
MAX_COMPARE_RUNS = 50

KeysQuery = Annotated[
    str | None,
    Query(max_length=1000, description=f"Comma-separated metric keys (default loss) out of: {', '.join(METRIC_KEYS)}"),
]
MaxPointsQuery = Annotated[
    int | None,
    Query(ge=2, le=10_000_000, description="Downsample to about this many points, keeping each bucket's min and max"),
]


SmoothingQuery = Annotated[
    float | None,
    Query(
        ge=0,
        lt=1,
        description="Also answer `smoothed`: each series' debiased EMA with this weight, run over every recorded "
        "step and read at the steps answered (so a downsampled curve is smoothed exactly as the full one), and "
        "`smoothing_state`: per series [EMA sum, values folded in] at the last step, to continue it on new rows",
    ),
]


class MetricsPublic(BaseModel):
    run_id: int
    steps: list[int]
    series: dict[str, list[float | None]]
    downsampled: bool
    smoothed: dict[str, list[float | None]] | None = None
    smoothing_state: dict[str, list[float]] | None = None


class CompareRun(BaseModel):
    id: int
    name: str
    learning_rate: float
    status: str
    sweep_id: int | None
    steps: list[int]
    series: dict[str, list[float | None]]
    downsampled: bool
    smoothed: dict[str, list[float | None]] | None = None
    smoothing_state: dict[str, list[float]] | None = None


class ComparePublic(BaseModel):
    keys: list[str]
    runs: list[CompareRun]


def _invalid(where: str, name: str, message: str) -> HTTPException:
    """422 in FastAPI's own shape, naming the parameter and the reason."""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"loc": [where, name], "msg": message, "type": "value_error"}]
    )


def _keys(raw: str | None, custom: list[str] | None = None) -> list[str]:
    try:
        return parse_keys(raw, custom or ())
    except UnknownKeys as exc:
        raise _invalid("query", "keys", str(exc)) from None


def with_smoothing(
    db: sqlite3.Connection, run_id: int, body: dict[str, Any], keys: list[str], weight: float
) -> dict[str, Any]:
    """Add to one run's answer each series smoothed over every recorded step (not over the answered points)
    at the answered steps, and the EMA's state at the last recorded step."""
    full = read_metrics(db, run_id, keys)
    smoothed, state = {}, {}
    for key in keys:
        ema, by_step = DebiasedEma(weight), {}
        values = ema_smooth(full.series[key], weight)  # the dashboard's rule, a constant series included
        for step, raw, value in zip(full.steps, full.series[key], values, strict=True):
            ema.update(raw)
            by_step[step] = value if math.isfinite(value) else None
        smoothed[key] = [by_step.get(step) for step in body["steps"]]
        state[key] = [ema.last, ema.count]
    return {**body, "smoothed": smoothed, "smoothing_state": state}


def _require_run(db: sqlite3.Connection, run_id: int) -> None:
    if db.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
        raise NotFound(f"no run with id {run_id}")


@router.get("/runs/{run_id}/metrics", response_model=MetricsPublic)
def run_metrics(
    run_id: RunId,
    db: DbDep,
    keys: KeysQuery = None,
    since_step: Annotated[int | None, Query(ge=-1, le=MAX_ID, description="Only steps after this one")] = None,
    max_points: MaxPointsQuery = None,
    smoothing: SmoothingQuery = None,
) -> Response:
    """A run's series aligned on `steps` (null where a value was not recorded). Every step unless
    `max_points` is given; then `downsampled` says whether points were dropped (never a spike)."""
    _require_run(db, run_id)
    metric_keys = _keys(keys, scalar_keys(db, run_id))  # the run's own keys too (GET .../metric-keys)
    body = metrics_json(db, run_id, metric_keys, since_step, max_points)
    if smoothing is not None:
        body = json.dumps(with_smoothing(db, run_id, json.loads(body), metric_keys, smoothing), allow_nan=False)
    return Response(body, media_type="application/json")


@router.get(
    "/runs/{run_id}/metrics.csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}, "description": "step, every metric column and eval_loss"}},
)
def run_metrics_csv(run_id: RunId, db: DbDep, engine: EngineDep) -> StreamingResponse:
    """Every recorded step with all metric columns, streamed as CSV."""
    _require_run(db, run_id)

    def chunks() -> Iterator[str]:
        proxy = engine.raw_connection()  # its own connection: the request's is returned when the route ends
        try:
            conn = proxy.driver_connection
            assert isinstance(conn, sqlite3.Connection)
            yield from iter_csv(conn, run_id)
        finally:
            proxy.close()

    headers = {"Content-Disposition": f'attachment; filename="run-{run_id}-metrics.csv"'}
    return StreamingResponse(chunks(), media_type="text/csv", headers=headers)


@router.get("/compare", response_model=ComparePublic)
def compare(
    db: DbDep,
    ids: Annotated[str, Query(max_length=2000, description="Comma-separated run ids, e.g. 1,2,3")],
    keys: KeysQuery = None,
    max_points: MaxPointsQuery = None,
    smoothing: SmoothingQuery = None,
) -> Response:
    """The series of several runs in one answer, each with its name, learning rate and status."""
    run_ids: list[int] = []
    for part in ids.split(","):
        text = part.strip()
        if not text:
            continue
        if not text.isdigit() or not 1 <= int(text) <= MAX_ID:
            raise _invalid("query", "ids", f"{text!r} is not a run id")
        if int(text) not in run_ids:
            run_ids.append(int(text))
    if not 1 <= len(run_ids) <= MAX_COMPARE_RUNS:
        raise _invalid("query", "ids", f"give between 1 and {MAX_COMPARE_RUNS} run ids")
    metric_keys = _keys(keys)
    try:
        body = compare_json(db, run_ids, metric_keys, max_points)
    except LookupError as exc:
        raise NotFound(str(exc)) from None
    if smoothing is not None:
        answer = json.loads(body)
        answer["runs"] = [with_smoothing(db, run["id"], run, metric_keys, smoothing) for run in answer["runs"]]
        body = json.dumps(answer, allow_nan=False)
    return Response(body, media_type="application/json")


# --- Server-Sent Events ---------------------------------------------------------------------------------


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id is not None else "")
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _status(engine: Engine, run_id: int) -> dict[str, Any] | None:
    with Session(engine) as session:
        run = session.get(Run, run_id)
        return None if run is None else RunPublic.model_validate(run).model_dump(mode="json", exclude={"config"})


@dataclass
class _Poll:
    run: dict[str, Any] | None
    messages: list[str]
    after: int
    more: bool
    """A full batch of rows came back: read again at once."""


def _poll(engine: Engine, run_id: int, after: int) -> _Poll:
    """The run's status and SSE messages for the rows after step `after`. The status is read first,
    so when it says finished, every row is already visible to the row query."""
    run = _status(engine, run_id)
    proxy = engine.raw_connection()
    try:
        conn = proxy.driver_connection
        assert isinstance(conn, sqlite3.Connection)
        steps, evals = new_rows(conn, run_id, after, EVENT_BATCH_ROWS)
    finally:
        proxy.close()
    messages = []
    if steps.steps:
        after = steps.steps[-1]
        messages.append(_sse("steps", {"steps": steps.steps, "series": steps.series}, after))
    if evals.steps:
        messages.append(_sse("eval", {"steps": evals.steps, "series": evals.series}))
    return _Poll(run, messages, after, more=len(steps.steps) == EVENT_BATCH_ROWS)


async def _events(engine: Engine, run_id: int, after: int) -> AsyncIterator[str]:
    last_state: tuple[Any, ...] | None = None
    last_sent = time.monotonic()
    while True:
        poll = await run_in_threadpool(_poll, engine, run_id, after)
        if poll.run is None:
            yield _sse("status", {"id": run_id, "status": "deleted"})
            return
        after = poll.after
        for message in poll.messages:
            yield message
        run = poll.run
        state = (run["status"], run["error"], run["total_steps"], run["cancel_requested_at"])
        finished = run["status"] in FINISHED and not poll.more
        sent = bool(poll.messages)
        if state != last_state or finished:
            yield _sse("status", run)
            last_state, sent = state, True
        if finished:
            return
        now = time.monotonic()
        if sent:
            last_sent = now
        elif now - last_sent > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = now
        if not poll.more:
            await asyncio.sleep(EVENT_POLL_SECONDS)


@router.get(
    "/runs/{run_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
def run_events(
    run_id: RunId,
    db: DbDep,
    engine: EngineDep,
    since_step: Annotated[int, Query(ge=-1, le=MAX_ID, description="Send rows after this step (-1: all)")] = -1,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> StreamingResponse:
    """Follow a run live: `event: steps` (new step rows, every metric column), `event: eval` (eval
    losses) and `event: status` (the run, without its config, whenever its status changes). The
    stream ends after the run finishes. A reconnecting EventSource resumes from its Last-Event-ID."""
    _require_run(db, run_id)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else since_step
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        _events(engine, run_id, min(after, MAX_ID)), media_type="text/event-stream", headers=headers
    )
