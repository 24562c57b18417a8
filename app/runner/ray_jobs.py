"""The Ray executor: every run is a Ray job (the Jobs API of the cluster at STEPSCOPE_RAY_ADDRESS).

A job runs `python -m trainer --run-id N --server URL`: it reads its run over HTTP and records through
the ingest API (`trainer.http_recorder`), so a worker never touches this server's database. Ray does the
queueing and placement: the runner submits every queued run at once, each asking for one CPU (and one
GPU when its device is cuda), and the cluster starts as many as fit.

The submission id names the run and the attempt (`stepscope-<home>-run-<id>-<attempt>`, <home> a digest
of this server's data directory, so two servers sharing a cluster never take each other's jobs): after a
server restart the runner finds a run's latest job by that name and watches it again (re-attached, not
resubmitted); a job that ended without its run recording an end leaves the run `interrupted`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from app import services
from app.config import Settings
from app.runner.executor import ClusterUnreachable, JobState
from app.runner.recovery import EXTERNAL, settle_if_silent
from app.runner.runner import JobRunner
from store.tables import FINISHED, Run, RunStatus, utcnow

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOG_TAIL_LINES = 20
CHECK_SECONDS = 5.0
"""How long a failed look at the cluster is remembered before the next request tries again."""


class RayExecutor:
    """Ray's Jobs API behind the executor interface (app.runner.executor.Executor)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        digest = hashlib.sha1(str(settings.home.expanduser().resolve()).encode()).hexdigest()[:8]
        self.prefix = f"stepscope-{digest}-run-"
        self._client: Any = None
        self._failed_at = -CHECK_SECONDS
        self._failure = ""

    def client(self) -> Any:
        """The cluster's JobSubmissionClient (ClusterUnreachable while it does not answer)."""
        if self._client is not None:
            return self._client
        if time.monotonic() - self._failed_at < CHECK_SECONDS:
            raise ClusterUnreachable(self._failure)
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise ClusterUnreachable('STEPSCOPE_EXECUTOR=ray needs the ray extra: pip install -e ".[ray]"') from None
        try:
            self._client = JobSubmissionClient(self.settings.ray_address)
        except Exception as exc:  # ConnectionError, or a wrong address: the reason goes to the 503
            self._failed_at = time.monotonic()
            self._failure = f"the Ray cluster at {self.settings.ray_address} cannot be reached: {exc}"
            raise ClusterUnreachable(self._failure) from None
        return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self.client()
        try:
            return getattr(client, method)(*args, **kwargs)
        except (OSError, ConnectionError) as exc:  # requests' ConnectionError is an OSError
            self._client, self._failed_at = None, time.monotonic()
            self._failure = f"the Ray cluster at {self.settings.ray_address} stopped answering: {exc}"
            raise ClusterUnreachable(self._failure) from None

    def check(self) -> None:
        self.client()

    def _attempts(self, run_id: int) -> dict[int, Any]:
        """The run's jobs on the cluster by attempt number."""
        name = re.compile(re.escape(f"{self.prefix}{run_id}-") + r"(\d+)")
        found = {}
        for job in self._call("list_jobs"):
            match = name.fullmatch(job.submission_id or "")
            if match:
                found[int(match.group(1))] = job
        return found

    def start(self, run: Run) -> str:
        assert run.id is not None
        attempts = self._attempts(run.id)
        submission_id = f"{self.prefix}{run.id}-{max(attempts, default=0) + 1}"
        device = str(run.config.get("device", "auto"))
        entrypoint = f"python -m trainer --run-id {run.id} --server {self.settings.reachable_url}"
        self._call(
            "submit_job",
            entrypoint=entrypoint,
            submission_id=submission_id,
            entrypoint_num_cpus=1,
            entrypoint_num_gpus=1 if device.startswith("cuda") else 0,
            runtime_env={"env_vars": self._env()},
            metadata={"stepscope_run": str(run.id), "stepscope_name": run.name[:100]},
        )
        return submission_id

    def _env(self) -> dict[str, str]:
        env = {
            "STEPSCOPE_HOME": str(self.settings.home),  # checkpoints and adapters (the server's own on one node)
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
            # A cancel is SIGTERM: the trainer finishes its step, records and exits; Ray kills it after this.
            "RAY_JOB_STOP_WAIT_TIME_S": str(int(self.settings.cancel_grace_seconds)),
        }
        if self.settings.token:
            env["STEPSCOPE_TOKEN"] = self.settings.token  # the job records through the API, which needs it
        return env

    def poll(self, handle: str) -> JobState:
        info = self._call("get_job_info", handle)
        return JobState(str(info.status.value).lower(), info.message or "")

    def stop(self, handle: str, why: str) -> None:
        log.info("%s: stopping it (%s)", handle, why)
        self._call("stop_job", handle)

    def logs(self, handle: str) -> str:
        try:
            text = str(self._call("get_job_logs", handle))
        except Exception:  # logs are a courtesy: an unreachable cluster or a lost job has none
            return ""
        shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
        return "\n".join([line for line in shown if line][-LOG_TAIL_LINES:])

    def recover(self, run_id: int) -> str | None:
        attempts = self._attempts(run_id)
        return attempts[max(attempts)].submission_id if attempts else None


@dataclass
class RayJob:
    run_id: int
    handle: str
    stop_sent: bool = False


class RayRunner(JobRunner):
    """The job runner's poll loop with Ray as the executor. Stopping the server leaves the jobs running on
    the cluster: the next server re-attaches to them."""

    def __init__(self, settings: Settings, engine: Any, executor: RayExecutor | None = None) -> None:
        super().__init__(settings, engine)
        self.executor = executor or RayExecutor(settings)
        self.ray_jobs: dict[int, RayJob] = {}

    @property
    def max_concurrent(self) -> int:
        return 0  # Ray places the jobs: no limit of ours

    @property
    def jobs(self) -> dict[int, Any]:
        return self.ray_jobs

    @jobs.setter
    def jobs(self, value: dict[int, Any]) -> None:
        pass  # JobRunner.__init__ sets its own; this runner's jobs are ray_jobs

    def check_ready(self) -> None:
        self.executor.check()

    def stop(self, timeout: float | None = None) -> None:
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.ray_jobs:
            log.info("leaving %d Ray jobs running: the next server re-attaches to them", len(self.ray_jobs))
        self.ray_jobs.clear()
        assert self._lock_file is not None
        self._lock_file.close()
        self._lock_file, self.active = None, False

    def tick(self) -> None:
        """Watch the jobs, deliver cancels, re-attach or settle runs nobody watches, submit queued runs."""
        with Session(self.engine) as session:
            active = {
                run.id: run
                for run in session.exec(select(Run).where(col(Run.status).in_([RunStatus.queued, RunStatus.running])))
            }
        try:
            for job in list(self.ray_jobs.values()):
                self._watch_ray(job, active.get(job.run_id))
            for run_id, run in active.items():
                assert run_id is not None
                if run_id in self.ray_jobs:
                    continue
                if run.kind == EXTERNAL:
                    settle_if_silent(self.engine, run)
                elif run.status == RunStatus.running or run.pid is not None:
                    self._reattach(run)
            queued = [r for r in active.values() if r.status == RunStatus.queued and r.pid is None]
            for run in sorted(queued, key=lambda r: r.id or 0):
                if run.cancel_requested_at is None and run.kind != EXTERNAL:
                    self._submit(run)
        except ClusterUnreachable as exc:  # queued runs wait; running ones are looked at again next poll
            log.warning("job runner: %s", exc)

    def _watch_ray(self, job: RayJob, run: Run | None) -> None:
        state = self.executor.poll(job.handle)
        if state.ended:
            self.ray_jobs.pop(job.run_id)
            self._settle_ray(job.run_id, job.handle, state)
        elif run is not None and run.cancel_requested_at is not None and not job.stop_sent:
            self.executor.stop(job.handle, "cancel")
            job.stop_sent = True

    def _settle_ray(self, run_id: int, handle: str, state: JobState) -> None:
        """After a job ended: a run that recorded no end is `cancelled` (if asked) or `interrupted` (resumable)."""
        with Session(self.engine) as session:
            run = session.get(Run, run_id)
            if run is None:
                return
            if run.status not in FINISHED:
                if run.cancel_requested_at is not None:
                    run.status = RunStatus.cancelled
                else:
                    run.status = RunStatus.interrupted
                    tail = self.executor.logs(handle)
                    reason = f"its Ray job {handle} ended ({state.state}: {state.message}) with no end recorded"
                    reason = reason.replace(": )", ")")
                    run.error = f"{reason}\n--- last lines of its log ---\n{tail}" if tail else reason
                run.finished_at = utcnow()
                session.add(run)
                session.commit()
                log.info("run %d: %s (Ray job %s %s)", run_id, run.status.value, handle, state.state)
            if run.sweep_id is not None:
                services.judge_sweep(session, run.sweep_id)

    def _reattach(self, run: Run) -> None:
        assert run.id is not None
        handle = self.executor.recover(run.id)
        if handle is not None:
            state = self.executor.poll(handle)
            if not state.ended:
                log.info("run %d: watching its Ray job %s again (%s)", run.id, handle, state.state)
                self.ray_jobs[run.id] = RayJob(run.id, handle)
                return
            self._settle_ray(run.id, handle, state)
            return
        if run.status == RunStatus.queued and run.cancel_requested_at is None:
            self._mark(run.id, pid=None)  # claimed by a server that went away before submitting: queue it again
            return
        self._settle_ray(run.id, "(none)", JobState("failed", "no job of this run is known to the cluster"))

    def _submit(self, run: Run) -> None:
        assert run.id is not None
        if not self._claim(run.id):
            return
        try:
            handle = self.executor.start(run)
        except ClusterUnreachable:
            self._mark(run.id, pid=None)  # not submitted: it stays queued for the next poll
            raise
        except Exception as exc:  # refused by the cluster (a bad request): the run cannot start
            self._mark(run.id, status=RunStatus.failed, error=f"Ray refused the job: {exc}", finished_at=utcnow())
            return
        self.ray_jobs[run.id] = RayJob(run.id, handle)
        log.info("run %d: submitted Ray job %s", run.id, handle)


def make_runner(settings: Settings, engine: Any) -> JobRunner:
    """The job runner for the chosen executor (STEPSCOPE_EXECUTOR)."""
    return RayRunner(settings, engine) if settings.executor == "ray" else JobRunner(settings, engine)
