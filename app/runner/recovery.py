"""Runs that no job of this server watches: a previous server's jobs, `stepscope train` in a terminal,
or rows whose process is gone. Each is adopted (watched as a job) or settled in the database."""

from __future__ import annotations

import logging
import os

from sqlalchemy import Engine
from sqlmodel import Session

from app.config import Settings
from app.runner.processes import Job, cmdline, is_same_process
from store.tables import FINISHED, Run, RunStatus, utcnow

log = logging.getLogger(__name__)


def adopt_or_settle(engine: Engine, settings: Settings, run: Run) -> Job | None:
    """A Job for the run's live process, or None after giving the run the status it ends with.

    A queued run claimed by a server that went away before starting it is queued again.
    """
    assert run.id is not None
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
