"""The poll loop that runs training jobs, whichever executor runs them.

The database is the only channel between the API and the runner: the API inserts queued runs and sets
`cancel_requested_at`; the runner's thread polls the `runs` table, hands queued runs (oldest first) to
the executor while it has room, asks it to stop the attempts whose cancel was requested (and to kill one
still going after the grace period), re-attaches after a restart to the attempts the executor still knows,
and writes the outcome a job could not write itself (killed by a signal or a lost worker: `interrupted`,
so it can be resumed; ended without a result: `failed`; both with the last lines of its log).

The executor (`app.runner.executor`) is this server's subprocesses (`processes.LocalExecutor`, the default)
or a Ray cluster (`ray_jobs.RayExecutor`, STEPSCOPE_EXECUTOR=ray).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from sqlalchemy import Engine, func, update
from sqlmodel import Session, col, select

from app import services
from app.config import Settings
from app.runner.executor import ClusterUnreachable, Executor, Handle, JobRefused
from app.runner.processes import LocalExecutor, job_command
from app.runner.ray_jobs import RayExecutor
from app.runner.recovery import EXTERNAL, settle_if_silent
from store.tables import FINISHED, Run, RunStatus, utcnow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.3
LOG_TAIL_LINES = 20
"""The end of a job's log that goes into its run's error when the job could not record its own end."""
KILL_WAIT_SECONDS = 5.0
"""At shutdown, how long a killed job is given to be gone before its run is settled anyway."""


class JobRunner:
    """Hands queued runs to the executor and watches them. One per data directory (a lock file)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        executor: Executor | None = None,
        *,
        command: Callable[[int], list[str]] = job_command,
    ) -> None:
        """`command`: the local executor's job command line (the tests' stand-in jobs)."""
        self.settings = settings
        self.engine = engine
        self.executor: Executor = executor or LocalExecutor(settings, command)
        self.jobs: dict[int, Handle] = {}
        """Run id -> the executor's handle of the attempt this runner watches."""
        self._kill_at: dict[int, float] = {}
        """Run id -> monotonic time after which a job asked to stop is killed."""
        self.active = False
        self._lock_file: IO[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def max_concurrent(self) -> int:
        return self.executor.max_concurrent

    @property
    def gpus(self) -> list[str] | None:
        return self.executor.gpus

    # --- life cycle ---

    def start(self) -> None:
        """Take the data directory's lock, settle what a previous server left behind, start polling."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        lock = (self.settings.home / "runner.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            log.warning("another stepscope server runs jobs for %s: this one will not start any", self.settings.home)
            return
        self._lock_file, self.active = lock, True
        self.tick()
        if self.settings.resume_interrupted:
            self._resume_interrupted()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="stepscope-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling and stop the jobs the executor stops at a shutdown (local ones: SIGUSR1, they end
        `interrupted`; killed if still going after `timeout`), so none stays `running`. Those it does not
        stop (Ray jobs, `stepscope train` in a terminal) run on: the next server re-attaches to them."""
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        stopping = {run_id: h for run_id, h in self.jobs.items() if self.executor.stop(h, "shutdown")}
        grace = self.settings.cancel_grace_seconds if timeout is None else timeout
        going = self._wait_for_ends(stopping, grace)
        for handle in going.values():
            self.executor.stop(handle, "kill")
        self._wait_for_ends(going, KILL_WAIT_SECONDS)
        for run_id in stopping:
            self._settle(run_id, interrupted=True, reason="the server stopped while the run was going")
        if len(self.jobs) > len(stopping):
            log.info("leaving %d jobs running: the next server re-attaches to them", len(self.jobs) - len(stopping))
        self.jobs.clear()
        self._kill_at.clear()
        assert self._lock_file is not None
        self._lock_file.close()
        self._lock_file, self.active = None, False

    def _wait_for_ends(self, handles: dict[int, Handle], seconds: float) -> dict[int, Handle]:
        """Those of `handles` still going after up to `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            handles = {run_id: h for run_id, h in handles.items() if not self.executor.poll(h).ended}
            if not handles or time.monotonic() >= deadline:
                return handles
            time.sleep(0.05)

    def check_ready(self) -> None:
        """Raise app.runner.executor.ClusterUnreachable when no job could start now (never, for subprocesses)."""
        self.executor.check()

    def _resume_interrupted(self) -> None:
        """STEPSCOPE_RESUME_INTERRUPTED: queue again every run a shutdown or a crash interrupted (those this
        start just found gone included); they go on from their last checkpoint."""
        with Session(self.engine) as session:
            interrupted = session.exec(select(Run.id).where(col(Run.status) == RunStatus.interrupted)).all()
            for run_id in interrupted:
                assert run_id is not None
                services.resume_run(session, run_id)
                log.info("run %d: interrupted before, resumed (STEPSCOPE_RESUME_INTERRUPTED)", run_id)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.tick()
            except Exception:  # a locked database or a full disk must not kill the runner
                log.exception("job runner poll failed")

    # --- one poll ---

    def tick(self) -> None:
        """Watch the jobs, deliver cancels, re-attach or settle runs nobody watches, start queued runs."""
        with Session(self.engine) as session:
            active = {
                run.id: run
                for run in session.exec(select(Run).where(col(Run.status).in_([RunStatus.queued, RunStatus.running])))
            }
        try:
            # A run whose attempt ended just now is left alone for the rest of this poll: `active` was read
            # before its end was settled, and a user may have resumed it since (then it is queued again).
            ended = {run_id for run_id, h in list(self.jobs.items()) if self._watch(run_id, h, active.get(run_id))}
            for run_id, run in active.items():
                assert run_id is not None
                if run_id in self.jobs or run_id in ended:
                    continue
                if run.kind == EXTERNAL:
                    settle_if_silent(self.engine, run)
                elif run.status == RunStatus.running or run.pid is not None:
                    self._reattach(run)
            queued = [
                r
                for r in active.values()
                if r.status == RunStatus.queued and r.pid is None and r.cancel_requested_at is None
                and r.kind != EXTERNAL
            ]  # fmt: skip
            if queued:
                self.executor.check()
                limit = self.executor.max_concurrent
                room = len(queued) if limit == 0 else max(0, limit - len(self.jobs))
                for run in sorted(queued, key=lambda r: r.id or 0)[:room]:
                    self._submit(run)
        except ClusterUnreachable as exc:  # queued runs wait; running ones are looked at again next poll
            log.warning("job runner: %s", exc)

    def _watch(self, run_id: int, handle: Handle, run: Run | None) -> bool:
        """Look at one attempt (stop it if asked, settle its run if it ended); whether it ended."""
        state = self.executor.poll(handle)
        if state.ended:
            self.jobs.pop(run_id, None)
            self._kill_at.pop(run_id, None)
            self._settle(run_id, state.interrupted, state.reason)
            return True
        if run is None:  # deleted or finished while the job lingers (it is saving): nothing to do
            return False
        if run_id in self._kill_at:
            if time.monotonic() >= self._kill_at[run_id]:
                log.info(
                    "run %d: still going %.0f s after its stop, killing it", run_id, self.settings.cancel_grace_seconds
                )
                self.executor.stop(handle, "kill")
                self._kill_at[run_id] = math.inf
        elif run.cancel_requested_at is not None:
            log.info("run %d: cancel requested, stopping its job", run_id)
            self.executor.stop(handle, "cancel")
            self._kill_at[run_id] = time.monotonic() + self.settings.cancel_grace_seconds
        return False

    def _reattach(self, run: Run) -> None:
        """A run that no attempt of this server's watches: watch its attempt again if the executor still knows
        it; otherwise queue it again (claimed by a server that went away before starting it) or end it."""
        assert run.id is not None
        handle = self.executor.reattach(run)
        if handle is not None:
            self.jobs[run.id] = handle
            self._watch(run.id, handle, run)
        elif run.status == RunStatus.queued and run.cancel_requested_at is None:
            self._requeue(run.id)
        else:
            self._settle(run.id, interrupted=True, reason=self.executor.gone)

    def _settle(self, run_id: int, interrupted: bool, reason: str) -> None:
        """After a job ended: give its run a final status if the job could not write one (`cancelled` if one
        was asked for), then judge its sweep's rates."""
        with Session(self.engine) as session:
            run = session.get(Run, run_id)
            if run is None:
                return
            if run.status not in FINISHED:
                if run.cancel_requested_at is not None:
                    run.status = RunStatus.cancelled
                else:
                    run.status = RunStatus.interrupted if interrupted else RunStatus.failed
                    tail = "\n".join(self.executor.logs(run_id, LOG_TAIL_LINES))
                    run.error = f"{reason}\n--- last lines of its log ---\n{tail}" if tail else reason
                run.finished_at = utcnow()
                session.add(run)
                session.commit()
                log.info("run %d: %s (%s)", run_id, run.status.value, reason)
            if run.sweep_id is not None:  # a sweep's run: judge its rate against its siblings'
                services.judge_sweep(session, run.sweep_id)

    def _claim(self, run_id: int) -> bool:
        """Mark a queued run as this server's (its pid) before starting it, so a cancel cannot slip in between;
        False if it is no longer an unclaimed, uncancelled queued run."""
        with Session(self.engine) as session:
            claim = (
                col(Run.id) == run_id,
                col(Run.status) == RunStatus.queued,
                col(Run.pid).is_(None),
                col(Run.cancel_requested_at).is_(None),
            )
            claimed = session.exec(update(Run).where(*claim).values(pid=os.getpid())).rowcount == 1
            session.commit()
        return claimed

    def _submit(self, run: Run) -> None:
        assert run.id is not None
        if not self._claim(run.id):
            return
        try:
            started = self.executor.submit(run, list(self.jobs.values()))
        except ClusterUnreachable:
            self._requeue(run.id)  # not started: it stays queued for the next poll
            raise
        except JobRefused as exc:
            self._mark(run.id, status=RunStatus.failed, error=str(exc), finished_at=utcnow())
            return
        self.jobs[run.id] = started.handle
        if started.pid is not None:  # pid and start time: this process (a restarted server finds it by them)
            self._mark(run.id, pid=started.pid, pid_start=started.pid_start)

    def _requeue(self, run_id: int) -> None:
        """Unclaim a queued run no attempt took, so the next poll starts it."""
        with Session(self.engine) as session:
            where = (col(Run.id) == run_id, col(Run.status) == RunStatus.queued)
            session.exec(update(Run).where(*where).values(pid=None))
            session.commit()

    def _mark(self, run_id: int, **values: Any) -> None:
        with Session(self.engine) as session:
            session.exec(update(Run).where(col(Run.id) == run_id).values(**values))
            session.commit()

    def counts(self) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.exec(select(Run.status, func.count()).group_by(Run.status)).all()
        return {str(status): n for status, n in rows}


def make_runner(settings: Settings, engine: Engine) -> JobRunner:
    """The job runner for the chosen executor (STEPSCOPE_EXECUTOR)."""
    return JobRunner(settings, engine, RayExecutor(settings) if settings.executor == "ray" else None)
