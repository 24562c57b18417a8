"""Runs that no job of this server watches: a previous server's jobs, `stepscope train` in a terminal,
or rows whose process is gone. Each is adopted (watched as a job) or settled in the database."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from app.config import Settings
from app.runner.processes import Job, cmdline, is_same_process
from store.tables import FINISHED, Run, RunStatus, utcnow

log = logging.getLogger(__name__)

EXTERNAL = "external"
"""The kind of a run that a script outside the server records through the ingest API (app.routers.ingest)."""
TRACKIO_SOURCE = "trackio"
"""The `stepscope_source` of a run recorded through the Trackio-compatible endpoints (app.routers.trackio)."""
SERVER_STARTED = datetime.now(UTC)
"""A client cannot reach a server that is down: its silence counts only from when this server started."""


def adopt_or_settle(engine: Engine, settings: Settings, run: Run) -> Job | None:
    """A Job for the run's live process, or None after giving the run the status it ends with.

    A queued run claimed by a server that went away before starting it is queued again.
    """
    assert run.id is not None
    if run.kind == EXTERNAL:
        settle_if_silent(engine, run)
        return None
    # Ours only if the pid is alive and started when the run recorded: a reused pid (or a process whose
    # start time cannot be read) belongs to someone else and is never adopted, so never signalled.
    if run.pid != os.getpid() and is_same_process(run.pid, run.pid_start):
        assert run.pid is not None
        line = cmdline(run.pid)  # now known to be the run's process: a job (--run-id) or `stepscope train`
        log.info("run %d: watching its process %d (started before this server)", run.id, run.pid)
        return Job(
            run.id,
            run.pid,
            pid_start=run.pid_start,
            stopped_by_us=b"--run-id" in line or not line,
            stderr_path=settings.runs_dir / str(run.id) / "stderr.log",
        )
    with Session(engine) as session:
        row = session.get(Run, run.id)
        if row is None or row.status in FINISHED:
            return None
        if row.status == RunStatus.queued and row.cancel_requested_at is None:
            row.pid = None  # claimed by a server that is gone before the job started: queue it again
        else:
            row.status = RunStatus.cancelled if row.cancel_requested_at else RunStatus.interrupted
            row.error = (
                None if row.cancel_requested_at else "its process was gone (the server or the machine restarted)"
            )
            row.finished_at = utcnow()
        session.add(row)
        session.commit()
    return None


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
