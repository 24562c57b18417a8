"""The poll loop that runs training jobs.

Each run is a separate process (`python -m trainer --run-id N`), so a crash or an out-of-memory kill
never takes the server down. The database is the only channel between the API and the runner: the
API inserts queued runs and sets `cancel_requested_at`; the runner's thread polls the `runs` table,
starts queued runs (oldest first) while fewer than `max_concurrent_runs` jobs run, signals jobs
whose cancel was requested, and writes the outcome the job itself could not write (killed by a
signal or OOM: `failed` with the tail of its stderr; stopped by a restart: `interrupted`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, func, update
from sqlmodel import Session, col, select

from app import services
from app.config import Settings
from app.runner import gpus as gpu_choice
from app.runner.processes import Job, exit_reason, job_command, stderr_tail
from app.runner.recovery import adopt_or_settle
from store.processes import process_start_time
from store.tables import FINISHED, Run, RunStatus, utcnow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.3
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class JobRunner:
    """Starts queued runs as subprocesses and watches them. One per data directory (a lock file)."""

    def __init__(self, settings: Settings, engine: Engine, command: Callable[[int], list[str]] = job_command) -> None:
        self.settings = settings
        self.engine = engine
        self.command = command
        self.jobs: dict[int, Job] = {}
        self.gpus: list[str] | None = None
        self.active = False
        self._lock_file: IO[str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        """Stop polling; SIGUSR1 every job (a shutdown, not a cancel: the jobs end `interrupted`), SIGKILL
        what is left after `timeout`; none stays `running`."""
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        jobs = [j for j in self.jobs.values() if j.stopped_by_us]
        for job in jobs:
            job.signal(signal.SIGUSR1)
        deadline = time.monotonic() + (self.settings.cancel_grace_seconds if timeout is None else timeout)
        while any(j.exit_code() is None for j in jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for job in jobs:
            if job.exit_code() is None:
                job.signal(signal.SIGKILL)
                if job.proc is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        job.proc.wait(5)
            self._settle(job, RunStatus.interrupted, "the server stopped while the run was going")
        for job in self.jobs.values():
            job.close_files()
        self.jobs.clear()
        assert self._lock_file is not None
        self._lock_file.close()
        self._lock_file, self.active = None, False

    def check_ready(self) -> None:
        """Raise app.runner.executor.ClusterUnreachable when no job could start now (never, for subprocesses)."""

    def _resume_interrupted(self) -> None:
        """STEPSCOPE_RESUME_INTERRUPTED: queue again every run a shutdown or a crash interrupted (those this
        start just found gone included); they go on from their last checkpoint."""
        with Session(self.engine) as session:
            interrupted = session.exec(select(Run.id).where(col(Run.status) == RunStatus.interrupted)).all()
            for run_id in interrupted:
                assert run_id is not None
                services.resume_run(session, run_id)
                log.info("run %d: interrupted before, resumed (STEPSCOPE_RESUME_INTERRUPTED)", run_id)

    @property
    def max_concurrent(self) -> int:
        return self.settings.max_concurrent_runs or max(1, len(self.gpus or []))

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.tick()
            except Exception:  # a locked database or a full disk must not kill the runner
                log.exception("job runner poll failed")

    # --- one poll ---

    def tick(self) -> None:
        """Reap ended jobs, deliver cancels, adopt or settle runs nobody watches, start queued runs."""
        with Session(self.engine) as session:
            active = {
                run.id: run
                for run in session.exec(select(Run).where(col(Run.status).in_([RunStatus.queued, RunStatus.running])))
            }
        for job in list(self.jobs.values()):
            self._watch(job, active.get(job.run_id))
        for run_id, run in active.items():
            assert run_id is not None
            if run_id not in self.jobs and (run.status == RunStatus.running or run.pid is not None):
                adopted = adopt_or_settle(self.engine, self.settings, run)
                if adopted is not None:
                    self.jobs[run_id] = adopted
        queued = [r for r in active.values() if r.status == RunStatus.queued and r.pid is None]
        queued = [r for r in queued if r.cancel_requested_at is None]
        if queued and self.gpus is None:
            self.gpus = gpu_choice.detect_gpus()
        for run in sorted(queued, key=lambda r: r.id or 0)[: max(0, self.max_concurrent - len(self.jobs))]:
            self._start(run)

    def _watch(self, job: Job, run: Run | None) -> None:
        code = job.exit_code()
        if code is not None:
            self.jobs.pop(job.run_id)
            job.close_files()
            code = code if job.proc is not None else None
            # A job killed by a signal (the OOM killer, kill -9) crashed: interrupted, so it can be resumed.
            self._settle(job, RunStatus.interrupted if code is not None and code < 0 else None, exit_reason(code))
            with Session(self.engine) as session:  # a sweep's run: judge its rate against its siblings'
                ended = session.get(Run, job.run_id)
                if ended is not None and ended.sweep_id is not None:
                    services.judge_sweep(session, ended.sweep_id)
        elif run is None:  # deleted or finished while the process lingers (it is saving): nothing to do
            return
        elif job.kill_at is not None and time.monotonic() >= job.kill_at:
            log.info(
                "run %d: still running %.0f s after SIGTERM, killing it", job.run_id, self.settings.cancel_grace_seconds
            )
            job.signal(signal.SIGKILL)
            job.kill_at = math.inf
        elif run.cancel_requested_at is not None and job.kill_at is None:
            log.info("run %d: cancel requested, sending SIGTERM to pid %d", job.run_id, job.pid)
            job.signal(signal.SIGTERM)
            job.kill_at = time.monotonic() + self.settings.cancel_grace_seconds

    def _settle(self, job: Job, status: RunStatus | None, reason: str) -> None:
        """After a job ended: give its run a final status if the job could not write one."""
        with Session(self.engine) as session:
            run = session.get(Run, job.run_id)
            if run is None or run.status in FINISHED:
                return
            if run.cancel_requested_at is not None:
                run.status = RunStatus.cancelled
            else:
                run.status = status or RunStatus.failed
                tail = stderr_tail(job.stderr_path) if job.stderr_path else ""
                run.error = f"{reason}\n--- last lines of its stderr ---\n{tail}" if tail else reason
            run.finished_at = utcnow()
            session.add(run)
            session.commit()
            log.info("run %d: %s (%s)", job.run_id, run.status.value, reason)

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

    def _start(self, run: Run) -> None:
        assert run.id is not None
        if not self._claim(run.id):
            return
        run_dir = self.settings.runs_dir / str(run.id)
        run_dir.mkdir(parents=True, exist_ok=True)
        gpu = gpu_choice.least_busy(
            self.gpus or [], run.config.get("device", "auto"), (j.gpu for j in self.jobs.values())
        )
        stdout, stderr = (run_dir / "stdout.log").open("wb"), (run_dir / "stderr.log").open("wb")
        try:
            proc = subprocess.Popen(
                self.command(run.id), env=self._job_env(gpu), cwd=run_dir, stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=stderr, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            stdout.close()
            stderr.close()
            self._mark(run.id, status=RunStatus.failed, error=f"could not start the job: {exc}", finished_at=utcnow())
            return
        self.jobs[run.id] = Job(
            run.id, proc.pid, proc, gpu=gpu, stderr_path=run_dir / "stderr.log", files=[stdout, stderr]
        )
        self._mark(run.id, pid=proc.pid, pid_start=process_start_time(proc.pid))  # pid and start: this process
        log.info("run %d: started job pid %d%s", run.id, proc.pid, f" on GPU {gpu}" if gpu else "")

    def _mark(self, run_id: int, **values: Any) -> None:
        with Session(self.engine) as session:
            session.exec(update(Run).where(col(Run.id) == run_id).values(**values))
            session.commit()

    def _job_env(self, gpu: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("STEPSCOPE_TOKEN", None)  # a job has no use for the API token
        env["STEPSCOPE_HOME"] = str(self.settings.home)
        env["STEPSCOPE_DATABASE_URL"] = self.settings.database_url
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def counts(self) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.exec(select(Run.status, func.count()).group_by(Run.status)).all()
        return {str(status): n for status, n in rows}
