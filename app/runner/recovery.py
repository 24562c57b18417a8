"""External runs, which no job of this server watches: a script records them through the ingest API
(app.routers.ingest), and the runner settles one whose client went silent (a killed script says nothing more).

The other runs nobody watches (a previous server's jobs, `stepscope train` in a terminal, rows whose process
is gone) are re-attached through the executor or settled by the runner (`JobRunner._reattach`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from store.tables import FINISHED, Run, RunStatus, utcnow

log = logging.getLogger(__name__)

EXTERNAL = "external"
"""The kind of a run that a script outside the server records through the ingest API (app.routers.ingest)."""
TRACKIO_SOURCE = "trackio"
"""The `stepscope_source` of a run recorded through the Trackio-compatible endpoints (app.routers.trackio)."""
SERVER_STARTED = datetime.now(UTC)
"""A client cannot reach a server that is down: its silence counts only from when this server started."""


def settle_if_silent(engine: Engine, run: Run, now: datetime | None = None) -> bool:
    """Mark an external run `interrupted` once its client has been silent longer than it said it may be
    (`heartbeat_seconds`; a killed script sends nothing more). Whether it did.

    A Trackio run ends `completed` instead: Trackio's client has no call that ends a run, so silence is
    how every one of them ends (and one that speaks again runs again, app.routers.trackio)."""
    if run.heartbeat_seconds is None:
        return False
    now = now or utcnow()
    last = max(_aware(run.heartbeat_at or run.created_at), SERVER_STARTED)
    if now - last <= timedelta(seconds=run.heartbeat_seconds):
        return False
    with Session(engine) as session:
        row = session.get(Run, run.id)
        if row is None or row.status in FINISHED or _aware(row.heartbeat_at or row.created_at) != _aware(
            run.heartbeat_at or run.created_at
        ):
            return False  # finished, or its client spoke since this poll read it
        if (row.config or {}).get("stepscope_source") == TRACKIO_SOURCE:
            row.status, row.error = RunStatus.completed, None
        else:
            row.status = RunStatus.interrupted
            row.error = f"its client sent nothing for {run.heartbeat_seconds:g} s (the script ended without finish)"
        row.finished_at, ended = now, row.status.value
        session.add(row)
        session.commit()
    log.info("run %d: %s (its client went silent)", run.id, ended)
    return True


def _aware(moment: datetime) -> datetime:
    """SQLite gives datetimes back without their zone (they are stored in UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
