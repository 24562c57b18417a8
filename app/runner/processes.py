"""One job's process: how it is started, signalled and watched, and what its end says."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from store.processes import process_start_time

STDERR_TAIL_LINES = 20


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
    stderr_path: Path | None = None
    kill_at: float | None = None
    """Monotonic time after which a job asked to stop gets SIGKILL."""
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
