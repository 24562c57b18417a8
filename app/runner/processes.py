"""The local executor: each attempt is a subprocess of this server (`python -m trainer --run-id N`), so a crash
or an out-of-memory kill never takes the server down. This module keeps the book on one job's process
(signals, exit codes, its stderr, which is its log) and adopts, after a restart, the processes a previous
server started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from app.config import Settings
from app.runner import gpus as gpu_choice
from app.runner.executor import DEFAULT_LOG_LINES, JobRefused, JobState, Started, StopWhy, last_lines
from store.processes import process_start_time
from store.tables import Run

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LOG_BYTES_PER_LINE = 512
"""How much of a log's end is read per line asked for (a trainer's lines are well under this)."""


def job_command(run_id: int) -> list[str]:
    return [sys.executable, "-m", "trainer", "--run-id", str(run_id)]


def process_state(pid: int) -> str | None:
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


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def is_same_process(pid: int | None, started: int | None) -> bool:
    """Whether `pid` is still the live process that started at `started` (see `store.processes`).

    A pid is reused once its process ends, so the recorded start time must match too; a process whose
    start time cannot be read (or a run that recorded none) is never taken for ours. The command line
    proves nothing: any process may be called "trainer".
    """
    if not pid or started is None:
        return False
    state = process_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    return process_start_time(pid) == started


def exit_reason(code: int | None) -> str:
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
    pid_start: int | None = None
    """The process's start time (clock ticks after boot): with `pid`, it names the process (not our child only)."""
    gpu: str | None = None
    files: list[IO[bytes]] = field(default_factory=list)

    def exit_code(self) -> int | None:
        """The exit code once the process has ended (None while it runs; 0 when it is not our child)."""
        if self.proc is not None:
            return self.proc.poll()
        return None if is_same_process(self.pid, self.pid_start) else 0

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is None and not is_same_process(self.pid, self.pid_start):
            return  # an adopted process that has ended: its pid may be someone else's by now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == signal.SIGKILL and self.proc is not None:
                os.killpg(self.pid, sig)  # the job's own session: also whatever it started
            else:
                os.kill(self.pid, sig)

    def close_files(self) -> None:
        for fh in self.files:
            fh.close()


class LocalExecutor:
    """This server's subprocesses behind the executor interface (app.runner.executor.Executor)."""

    gone = "its process was gone (the server or the machine restarted)"

    def __init__(self, settings: Settings, command: Callable[[int], list[str]] = job_command) -> None:
        self.settings = settings
        self.command = command
        self._gpus: list[str] | None = None

    @property
    def gpus(self) -> list[str] | None:
        return self._gpus

    @property
    def max_concurrent(self) -> int:
        return self.settings.max_concurrent_runs or max(1, len(self._gpus or []))

    def check(self) -> None:
        """Subprocesses can always start; learn the GPUs before the first one does (it may import torch)."""
        if self._gpus is None:
            self._gpus = gpu_choice.detect_gpus()

    def submit(self, run: Run, running: list[Job]) -> Started:
        assert run.id is not None
        run_dir = self.settings.runs_dir / str(run.id)
        run_dir.mkdir(parents=True, exist_ok=True)
        gpu = gpu_choice.least_busy(self._gpus or [], run.config.get("device", "auto"), (j.gpu for j in running))
        stdout, stderr = (run_dir / "stdout.log").open("wb"), (run_dir / "stderr.log").open("wb")
        try:
            proc = subprocess.Popen(
                self.command(run.id), env=self._env(gpu), cwd=run_dir, stdin=subprocess.DEVNULL,
                stdout=stdout, stderr=stderr, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            stdout.close()
            stderr.close()
            raise JobRefused(f"could not start the job: {exc}") from None
        job = Job(run.id, proc.pid, proc, gpu=gpu, files=[stdout, stderr])
        log.info("run %d: started job pid %d%s", run.id, proc.pid, f" on GPU {gpu}" if gpu else "")
        return Started(job, proc.pid, process_start_time(proc.pid))

    def _env(self, gpu: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("STEPSCOPE_TOKEN", None)  # a job has no use for the API token
        env["STEPSCOPE_HOME"] = str(self.settings.home)
        env["STEPSCOPE_DATABASE_URL"] = self.settings.database_url
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env

    def poll(self, handle: Job) -> JobState:
        code = handle.exit_code()
        if code is None:
            return JobState(ended=False)
        handle.close_files()
        code = code if handle.proc is not None else None  # not our child: its exit code is not ours to read
        # A job killed by a signal (the OOM killer, kill -9) crashed: interrupted, so it can be resumed.
        return JobState(ended=True, reason=exit_reason(code), interrupted=code is not None and code < 0)

    def stop(self, handle: Job, why: StopWhy) -> bool:
        if why == "shutdown" and not handle.stopped_by_us:
            return False
        sig = {"cancel": signal.SIGTERM, "kill": signal.SIGKILL, "shutdown": signal.SIGUSR1}[why]
        log.info("run %d: sending %s to pid %d (%s)", handle.run_id, sig.name, handle.pid, why)
        handle.signal(sig)
        return True

    def logs(self, run_id: int, lines: int = DEFAULT_LOG_LINES) -> list[str]:
        """The end of the job's stderr, where the trainer logs (its stdout holds no more than that)."""
        try:
            with (self.settings.runs_dir / str(run_id) / "stderr.log").open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - max(16_384, lines * LOG_BYTES_PER_LINE)))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return []
        return last_lines(text, lines)

    def job_info(self, run_id: int) -> None:
        return None  # a subprocess of this server: its pid and status are the run's own

    def reattach(self, run: Run) -> Job | None:
        """The run's live process if it is the one the run recorded: a reused pid (or a process whose start
        time cannot be read) belongs to someone else and is never adopted, so never signalled."""
        assert run.id is not None
        if run.pid == os.getpid() or not is_same_process(run.pid, run.pid_start):
            return None
        assert run.pid is not None
        line = cmdline(run.pid)  # now known to be the run's process: a job (--run-id) or `stepscope train`
        log.info("run %d: watching its process %d (started before this server)", run.id, run.pid)
        return Job(
            run.id,
            run.pid,
            pid_start=run.pid_start,
            stopped_by_us=b"--run-id" in line or not line,
        )
