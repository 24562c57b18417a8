"""Where jobs run: the small interface both executors answer, and what they answer with.

The job runner (`app.runner.runner.JobRunner`) keeps the queue, the statuses, cancels and recovery; an
executor only starts, watches, stops and reads the log of one attempt at a time:

- `LocalExecutor` (`app.runner.processes`): subprocesses of this server, a handle is a `processes.Job`;
- `RayExecutor` (`app.runner.ray_jobs`): Ray jobs on a cluster, a handle is the job's submission id.

A handle names one attempt at one run (a run resumed after an interruption is a second attempt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from store.tables import Run

Handle = Any
"""An executor's own name for one attempt: the runner keeps it and hands it back, never looks inside."""
StopWhy = Literal["cancel", "kill", "shutdown"]
"""`cancel`: a user's (the job records and exits); `kill`: it did not stop within the grace period;
`shutdown`: this server stops (a local job checkpoints and ends `interrupted`; a Ray job runs on)."""
DEFAULT_LOG_LINES = 200


@dataclass(frozen=True)
class JobInfo:
    """Where a run's latest attempt runs or ran, as the executor names it (the run page's log section)."""

    id: str
    """The executor's name for it: a Ray job's submission id."""
    status: str
    """The executor's word for its state (Ray's PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    node: str | None = None
    """The machine it runs on, where the executor says (a Ray node's address)."""
    url: str | None = None
    """Its page on the executor's own dashboard, if there is one."""


class ClusterUnreachable(Exception):
    """The executor cannot take jobs now (the cluster does not answer): queued runs wait, new ones get 503."""


class JobRefused(Exception):
    """The executor cannot start this run at all (no such program, a request the cluster refuses): it fails."""


@dataclass(frozen=True)
class Started:
    handle: Handle
    pid: int | None = None
    """The job's process, when the executor knows it at once (local): written to the run with `pid_start`,
    so that a restarted server finds it. A Ray job writes its own as it starts."""
    pid_start: int | None = None


@dataclass(frozen=True)
class JobState:
    """Whether an attempt ended; if it did, why (for the run's error, in case the job recorded no end) and
    whether the run may be resumed (`interrupted`: a signal or a lost worker ended it, not the run itself)."""

    ended: bool
    reason: str = ""
    interrupted: bool = False


class Executor(Protocol):
    gone: str
    """The error of a running run whose attempt this executor no longer knows (after a restart)."""

    @property
    def max_concurrent(self) -> int:
        """How many attempts may run at once; 0: no limit of ours (Ray queues and places them)."""

    @property
    def gpus(self) -> list[str] | None:
        """The GPUs jobs are spread over, for /api/health (None: not known here)."""

    def check(self) -> None:
        """Raise ClusterUnreachable (with the reason) when no job can be started now."""

    def submit(self, run: Run, running: list[Handle]) -> Started:
        """Start an attempt at the run (`running`: the attempts going on). Raises ClusterUnreachable (the run
        stays queued) or JobRefused (it fails)."""

    def poll(self, handle: Handle) -> JobState:
        """Where the attempt stands; once it says ended, the runner forgets the handle."""

    def stop(self, handle: Handle, why: StopWhy) -> bool:
        """Ask the attempt to stop; it ends on its own and the runner settles what it leaves. False when it
        is not stopped (a Ray job outlives the server, and so does a `stepscope train` in a terminal)."""

    def logs(self, run_id: int, lines: int = DEFAULT_LOG_LINES) -> list[str]:
        """The last lines the run's latest attempt printed ([] when there is none, or it cannot be read)."""

    def job_info(self, run_id: int) -> JobInfo | None:
        """The run's latest attempt as the executor sees it; None where it has nothing to add to the run's own
        row (a local subprocess), or cannot say now."""

    def reattach(self, run: Run) -> Handle | None:
        """The run's latest attempt, if it is still this executor's to watch (a server restart): the runner
        then polls it. None when none is known (a queued run goes back in the queue, a running one ends)."""


def last_lines(text: str, lines: int) -> list[str]:
    """The last non-blank lines of a log, each progress-bar redraw (`\\r`) collapsed to its last state."""
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return [line for line in shown if line][-lines:] if lines > 0 else []
