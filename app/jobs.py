"""Training jobs: queueing runs and sweeps, cancelling and deleting them, and the runner that executes them.

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
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from sqlalchemy import Engine, delete, func, update
from sqlmodel import Session, col, select

from app.config import Settings
from app.models import FINISHED, Dataset, EvalMetric, Run, RunStatus, StepMetric, Sweep, step_rollups, utcnow
from trainer.config import ConfigError, TrainConfig, make_config

log = logging.getLogger(__name__)

POLL_SECONDS = 0.3
STDERR_TAIL_LINES = 20
MAX_SWEEP_RUNS = 50
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class NotFound(LookupError):
    """No such run (or sweep, or dataset): the API answers 404."""


class Conflict(RuntimeError):
    """The request does not fit the run's state (cancel a finished run, delete a running one): 409."""


# --- services: what the API routes and the HTML forms call ---------------------------------------------


class Plan(NamedTuple):
    n_train: int
    updates_per_epoch: int
    total_steps: int


def _plan(session: Session, config: TrainConfig) -> Plan:
    """Check that the model and dataset exist and compute the step plan, or raise ConfigError."""
    # trainer.models and trainer.data import torch (seconds): only the first run created pays for it.
    from trainer.data import BUILTIN_DATASETS, plan_steps, split_sizes
    from trainer.models import ModelError, check_model

    try:
        check_model(config.model)
    except ModelError as exc:
        raise ConfigError("model", str(exc)) from None
    if config.dataset in BUILTIN_DATASETS:
        n_train = BUILTIN_DATASETS[config.dataset].n_train
    else:
        # Only the generated name of an uploaded dataset: a request never names a path on the server.
        upload = session.exec(select(Dataset).where(Dataset.filename == config.dataset)).first()
        if upload is None:
            raise ConfigError(
                "dataset",
                f"unknown dataset {config.dataset!r}: use a built-in ({', '.join(BUILTIN_DATASETS)}) "
                "or the filename of an uploaded dataset (GET /api/datasets)",
            )
        # The trainer holds out 10% (at most 200) of a file of 10 or more records for eval loss.
        n_rows = upload.n_rows
        n_train = split_sizes(n_rows)[0]
    per_epoch, total = plan_steps(n_train, config.batch_size, config.grad_accum_steps, config.epochs, config.step_limit)
    return Plan(n_train, per_epoch, total)


def _new_run(config: TrainConfig, plan: Plan, sweep_id: int | None, name: str = "") -> Run:
    return Run.for_config(config, name=name, sweep_id=sweep_id, **plan._asdict())


def create_run(session: Session, config: TrainConfig, sweep_id: int | None = None) -> Run:
    """Queue a run; ConfigError (field `model` or `dataset`, and why) if its sources do not exist."""
    run = _new_run(config, _plan(session, config), sweep_id)
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def log_spaced(low: float, high: float, count: int) -> list[float]:
    """`count` learning rates from `low` to `high`, evenly spaced on a log scale (3 significant digits)."""
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ConfigError("learning_rates", "min and max must be finite numbers with 0 < min <= max")
    if not 1 <= count <= MAX_SWEEP_RUNS:
        raise ConfigError("learning_rates.count", f"must be between 1 and {MAX_SWEEP_RUNS}")
    if count == 1:
        return [float(f"{low:.3g}")]
    ratio = math.log(high / low) / (count - 1)
    return [float(f"{low * math.exp(i * ratio):.3g}") for i in range(count)]


def create_sweep(session: Session, config: TrainConfig, learning_rates: Sequence[float], name: str = "") -> Sweep:
    """A sweep row and one queued run per learning rate (the base config's own rate is ignored)."""
    if config.kind != "train":
        raise ConfigError("config.kind", "a sweep runs 'train' jobs (an lr range test sweeps by itself)")
    if not 1 <= len(learning_rates) <= MAX_SWEEP_RUNS:
        raise ConfigError("learning_rates", f"give between 1 and {MAX_SWEEP_RUNS} learning rates")
    configs = []
    for i, lr in enumerate(learning_rates):
        try:
            configs.append(make_config({**config.model_dump(), "learning_rate": lr}))
        except ConfigError as exc:
            raise ConfigError(f"learning_rates.{i}", exc.reason) from None
    try:
        plan = _plan(session, config)  # checked once, before anything is written
    except ConfigError as exc:
        raise ConfigError(f"config.{exc.field}", exc.reason) from None
    sweep = Sweep(
        name=name or config.name, base_config=config.model_dump(mode="json"), learning_rates=list(learning_rates)
    )
    session.add(sweep)
    session.flush()
    assert sweep.id is not None
    for cfg in configs:
        prefix = sweep.name or f"sweep {sweep.id}"
        session.add(_new_run(cfg, plan, sweep.id, name=f"{prefix} lr={cfg.learning_rate:g}"))
    session.commit()
    session.refresh(sweep)
    return sweep


def sweep_runs(session: Session, sweep_id: int) -> list[Run]:
    return list(session.exec(select(Run).where(Run.sweep_id == sweep_id).order_by(col(Run.id))))


def cancel_run(session: Session, run_id: int) -> Run:
    """Cancel a queued or running run (NotFound, or Conflict if it already finished).

    A queued run that no job has picked up yet is cancelled at once; otherwise the request is
    recorded and the runner stops the job within a poll (the run keeps every row it recorded).
    """
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    if run.status in FINISHED:
        raise Conflict(f"run {run_id} already finished ({run.status.value})")
    now = utcnow()
    unclaimed = (col(Run.id) == run_id, col(Run.status) == RunStatus.queued, col(Run.pid).is_(None))
    done = session.exec(update(Run).where(*unclaimed).values(status=RunStatus.cancelled, finished_at=now))
    if done.rowcount == 0:
        pending = (col(Run.id) == run_id, col(Run.cancel_requested_at).is_(None))
        session.exec(update(Run).where(*pending).values(cancel_requested_at=now))
    session.commit()
    session.refresh(run)
    return run


def cancel_sweep(session: Session, sweep_id: int) -> list[Run]:
    """Cancel every run of the sweep that has not finished."""
    if session.get(Sweep, sweep_id) is None:
        raise NotFound(f"no sweep with id {sweep_id}")
    for run in sweep_runs(session, sweep_id):
        if run.status not in FINISHED:
            assert run.id is not None
            cancel_run(session, run.id)
    return sweep_runs(session, sweep_id)


def delete_run(session: Session, settings: Settings, run_id: int) -> None:
    """Delete a finished run: its row, its metric rows and its folder (adapter, logs)."""
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"no run with id {run_id}")
    if run.status not in FINISHED:
        raise Conflict(f"run {run_id} is {run.status.value}: cancel it first, only finished runs can be deleted")
    session.exec(delete(StepMetric).where(col(StepMetric.run_id) == run_id))
    session.exec(delete(EvalMetric).where(col(EvalMetric.run_id) == run_id))
    session.exec(delete(step_rollups).where(step_rollups.c.run_id == run_id))
    session.delete(run)
    session.commit()
    shutil.rmtree(settings.runs_dir / str(int(run_id)), ignore_errors=True)


# --- the runner ----------------------------------------------------------------------------------------


def detect_gpus() -> list[str]:
    """GPU ids to hand out through CUDA_VISIBLE_DEVICES ([] on a machine without CUDA GPUs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the CUDA runtime's variable, not a stepscope setting
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if not Path("/proc/driver/nvidia").exists() and not shutil.which("nvidia-smi"):
        return []  # no NVIDIA driver: not worth importing torch (seconds) to hear that
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _process_state(pid: int) -> str | None:
    """'R', 'S', 'Z', ... from /proc; None when there is no such process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"  # no /proc (not Linux): the process exists, its state is unknown
    return stat.rsplit(")", 1)[1].split()[0]


def is_training_process(pid: int | None) -> bool:
    """Whether `pid` is a live stepscope training process (a job, or `stepscope train` in a terminal)."""
    if not pid:
        return False
    state = _process_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"trainer" in cmdline or b"stepscope" in cmdline


def stderr_tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    """The last lines of a job's stderr (progress-bar redraws collapsed to their last state)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16_384))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return "\n".join([line for line in shown if line][-lines:])


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "its process ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"its process was killed by {name}{hint}"
    return f"its process exited with code {code} without recording a result"


@dataclass
class Job:
    run_id: int
    pid: int
    proc: subprocess.Popen[bytes] | None = None
    """None for a process this server did not start (found running at start-up)."""
    stopped_by_us: bool = True
    """Whether stopping the server stops it (jobs; not a `stepscope train` in someone's terminal)."""
    gpu: str | None = None
    stderr_path: Path | None = None
    kill_at: float | None = None
    """Monotonic time after which a job asked to stop gets SIGKILL."""
    files: list[IO[bytes]] = field(default_factory=list)

    def exit_code(self) -> int | None:
        """The exit code once the process has ended (None while it runs; 0 when it is not our child)."""
        if self.proc is not None:
            return self.proc.poll()
        return None if is_training_process(self.pid) else 0

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == signal.SIGKILL and self.proc is not None:
                os.killpg(self.pid, sig)  # the job's own session: also whatever it started
            else:
                os.kill(self.pid, sig)


def job_command(run_id: int) -> list[str]:
    return [sys.executable, "-m", "trainer", "--run-id", str(run_id)]


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
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="stepscope-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling; SIGTERM every job, SIGKILL what is left after `timeout`; none stays `running`."""
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        jobs = [j for j in self.jobs.values() if j.stopped_by_us]
        for job in jobs:
            job.signal(signal.SIGTERM)
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
            for fh in job.files:
                fh.close()
        self.jobs.clear()
        assert self._lock_file is not None
        self._lock_file.close()
        self._lock_file, self.active = None, False

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
                self._unwatched(run)
        queued = [r for r in active.values() if r.status == RunStatus.queued and r.pid is None]
        queued = [r for r in queued if r.cancel_requested_at is None]
        if queued and self.gpus is None:
            self.gpus = detect_gpus()
        for run in sorted(queued, key=lambda r: r.id or 0)[: max(0, self.max_concurrent - len(self.jobs))]:
            self._start(run)

    def _watch(self, job: Job, run: Run | None) -> None:
        code = job.exit_code()
        if code is not None:
            self.jobs.pop(job.run_id)
            for fh in job.files:
                fh.close()
            self._settle(job, None, _exit_reason(code if job.proc is not None else None))
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
            elif status is not None:
                run.status = status
                run.error = reason
            else:
                run.status = RunStatus.failed
                tail = stderr_tail(job.stderr_path) if job.stderr_path else ""
                run.error = f"{reason}\n--- last lines of its stderr ---\n{tail}" if tail else reason
            run.finished_at = utcnow()
            session.add(run)
            session.commit()
            log.info("run %d: %s (%s)", job.run_id, run.status.value, reason)

    def _unwatched(self, run: Run) -> None:
        """A run marked running (or claimed) that no job of ours runs: adopt its process or settle it."""
        assert run.id is not None
        if run.pid != os.getpid() and is_training_process(run.pid):
            assert run.pid is not None
            cmdline = _cmdline(run.pid)
            self.jobs[run.id] = Job(
                run.id,
                run.pid,
                stopped_by_us=b"--run-id" in cmdline or not cmdline,
                stderr_path=self.settings.runs_dir / str(run.id) / "stderr.log",
            )
            log.info("run %d: watching its process %d (started before this server)", run.id, run.pid)
            return
        with Session(self.engine) as session:
            row = session.get(Run, run.id)
            if row is None or row.status in FINISHED:
                return
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

    def _start(self, run: Run) -> None:
        assert run.id is not None
        with Session(self.engine) as session:  # claim it first, so a cancel cannot slip in between
            claim = (
                col(Run.id) == run.id,
                col(Run.status) == RunStatus.queued,
                col(Run.pid).is_(None),
                col(Run.cancel_requested_at).is_(None),
            )
            if session.exec(update(Run).where(*claim).values(pid=os.getpid())).rowcount != 1:
                return
            session.commit()
        run_dir = self.settings.runs_dir / str(run.id)
        run_dir.mkdir(parents=True, exist_ok=True)
        gpu = self._free_gpu(run.config.get("device", "auto"))
        env = self._job_env(gpu)
        stdout, stderr = (run_dir / "stdout.log").open("wb"), (run_dir / "stderr.log").open("wb")
        try:
            proc = subprocess.Popen(
                self.command(run.id), env=env, cwd=run_dir, stdin=subprocess.DEVNULL,
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
        self._mark(run.id, pid=proc.pid)
        log.info("run %d: started job pid %d%s", run.id, proc.pid, f" on GPU {gpu}" if gpu else "")

    def _mark(self, run_id: int, **values: Any) -> None:
        with Session(self.engine) as session:
            session.exec(update(Run).where(col(Run.id) == run_id).values(**values))
            session.commit()

    def _free_gpu(self, device: str) -> str | None:
        """The least busy GPU for a job whose device is auto or cuda (None: leave the environment alone)."""
        if not self.gpus or device not in ("auto", "cuda"):
            return None
        busy = [j.gpu for j in self.jobs.values()]
        return min(self.gpus, key=busy.count)

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


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
