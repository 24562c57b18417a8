"""What the job runner asks of the place where jobs run: the interface both executors answer.

The local executor is this server's own subprocesses (`app.runner.runner.JobRunner` with
`app.runner.processes`); the Ray executor is a Ray cluster's Jobs API (`app.runner.ray_jobs`). A handle
names one attempt at one run (a pid and its start time locally; a Ray submission id on a cluster).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from store.tables import Run


class ClusterUnreachable(Exception):
    """The executor cannot take jobs now (the cluster does not answer): queued runs wait, new ones get 503."""


@dataclass(frozen=True)
class JobState:
    """Where an attempt stands: `pending`, `running`, or ended (`succeeded`, `failed`, `stopped`)."""

    state: str
    message: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ("succeeded", "failed", "stopped")


class Executor(Protocol):
    def check(self) -> None:
        """Raise ClusterUnreachable (with the reason) when no job can be started now."""

    def start(self, run: Run) -> str:
        """Start an attempt at the run; its handle."""

    def poll(self, handle: str) -> JobState: ...

    def stop(self, handle: str, why: str) -> None:
        """Ask the attempt to stop (why: `cancel`); it ends on its own, the runner settles what it leaves."""

    def logs(self, handle: str) -> str:
        """The last lines the attempt printed."""

    def recover(self, run_id: int) -> str | None:
        """The handle of the run's latest attempt if the executor still knows it (a server restart)."""
