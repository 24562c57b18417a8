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


def is_training_process(pid: int | None) -> bool:
    """Whether `pid` is a live stepscope training process (a job, or `stepscope train` in a terminal)."""
    if not pid:
        return False
    state = process_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    try:
        line = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"trainer" in line or b"stepscope" in line


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

    def close_files(self) -> None:
        for fh in self.files:
            fh.close()
