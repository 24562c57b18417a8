"""The Ray executor: every run is a Ray job (the Jobs API of the cluster at STEPSCOPE_RAY_ADDRESS).

A job runs `python -m trainer --run-id N --server URL`: it reads its run over HTTP and records through
the ingest API (`trainer.http_recorder`), so a worker never touches this server's database. Ray does the
queueing and placement: the runner submits every queued run at once, each asking for one CPU (and one
GPU when its device is cuda, or auto on a cluster that has GPUs), and the cluster starts as many as fit.

The submission id names the run and the attempt (`stepscope-<home>-run-<id>-<attempt>`, <home> a digest
of this server's data directory, so two servers sharing a cluster never take each other's jobs): after a
server restart the runner finds a run's latest job by that name and watches it again (re-attached, not
resubmitted); a job that ended without its run recording an end leaves the run `interrupted`. A job's
log is Ray's (`get_job_logs`): the run page shows it, and its end goes into the run's error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from app.config import Settings
from app.runner.executor import (
    DEFAULT_LOG_LINES,
    ClusterUnreachable,
    JobInfo,
    JobRefused,
    JobState,
    Started,
    StopWhy,
    last_lines,
)
from store.settings import home_id
from store.tables import Run

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENDED = ("succeeded", "failed", "stopped")
"""Ray's terminal JobStatus values, lower-cased."""
CHECK_SECONDS = 5.0
"""How long a failed look at the cluster is remembered before the next request tries again."""


class RayExecutor:
    """Ray's Jobs API behind the executor interface (app.runner.executor.Executor); a handle is a submission id."""

    gone = "no Ray job of this run is known to the cluster"
    max_concurrent = 0  # Ray places the jobs: no limit of ours
    gpus = None  # the cluster's, not this server's (asked for per job: `gpus_to_ask`)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        digest = hashlib.sha1(str(settings.home.expanduser().resolve()).encode()).hexdigest()[:8]
        self.prefix = f"stepscope-{digest}-run-"
        self._client: Any = None
        self._failed_at = -CHECK_SECONDS
        self._failure = ""
        self._latest: dict[int, str] = {}
        """Run id -> the submission id of its latest attempt this server submitted or re-attached to."""
        self._nodes: dict[str, str] = {}
        """Node id -> its address, for the run page."""

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

    def submit(self, run: Run, running: list[str]) -> Started:
        assert run.id is not None
        attempts = self._attempts(run.id)
        submission_id = f"{self.prefix}{run.id}-{max(attempts, default=0) + 1}"
        device = str(run.config.get("device", "auto"))
        entrypoint = f"python -m trainer --run-id {run.id} --server {self.settings.reachable_url}"
        gpus = gpus_to_ask(device, self.cluster_resources().get("GPU", 0.0) if device == "auto" else 0.0)
        try:
            self._call(
                "submit_job",
                entrypoint=entrypoint,
                submission_id=submission_id,
                entrypoint_num_cpus=1,
                entrypoint_num_gpus=gpus,
                runtime_env={"env_vars": self._env()},
                metadata={"stepscope_run": str(run.id), "stepscope_name": run.name[:100], "stepscope_gpus": str(gpus)},
            )
        except ClusterUnreachable:
            raise
        except Exception as exc:  # refused by the cluster (a bad request): the run cannot start
            raise JobRefused(f"Ray refused the job: {exc}") from None
        self._latest[run.id] = submission_id
        log.info("run %d: submitted Ray job %s%s", run.id, submission_id, " (one GPU)" if gpus else "")
        return Started(submission_id)

    def cluster_resources(self) -> dict[str, float]:
        """What the cluster's live nodes have in all (`CPU`, `GPU`, ...), from Ray's state API; {} when it does
        not answer (then a job on `auto` asks for no GPU, as before the cluster could say)."""
        try:
            from ray.util.state import list_nodes

            nodes = list_nodes(address=self.settings.ray_address, timeout=10, raise_on_missing_output=False)
        except Exception as exc:  # an older Ray, or a state API that does not answer
            log.warning("could not read the Ray cluster's resources: %s", exc)
            return {}
        total: dict[str, float] = {}
        for node in nodes:
            if node.state == "ALIVE":
                for name, amount in (node.resources_total or {}).items():
                    total[name] = total.get(name, 0.0) + float(amount)
        return total

    def _env(self) -> dict[str, str]:
        env = {
            # The server's data directory: the job's too where the node sees it (its name, STEPSCOPE_SERVER_ID, is
            # there: one machine, a shared filesystem); elsewhere the job sends its files over HTTP.
            "STEPSCOPE_HOME": str(self.settings.home),
            "STEPSCOPE_SERVER_ID": home_id(self.settings.home),
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
        state, message = str(info.status.value).lower(), info.message or ""
        if state not in ENDED:
            return JobState(ended=False)
        reason = f"its Ray job {handle} ended ({state}: {message}) with no end recorded".replace(": )", ")")
        return JobState(ended=True, reason=reason, interrupted=True)  # a lost worker or node: resumable

    def stop(self, handle: str, why: StopWhy) -> bool:
        if why == "shutdown":
            return False  # the job runs on without this server: the next one re-attaches to it
        if why == "cancel":  # a kill needs no call: Ray kills the job RAY_JOB_STOP_WAIT_TIME_S after the stop
            log.info("%s: stopping it (%s)", handle, why)
            self._call("stop_job", handle)
        return True

    def logs(self, run_id: int, lines: int = DEFAULT_LOG_LINES) -> list[str]:
        try:
            handle = self._latest.get(run_id) or self.latest(run_id)
            text = str(self._call("get_job_logs", handle)) if handle else ""
        except Exception:  # logs are a courtesy: an unreachable cluster or a lost job has none
            return []
        return last_lines(text, lines)

    def job_info(self, run_id: int) -> JobInfo | None:
        try:
            handle = self._latest.get(run_id) or self.latest(run_id)
            if handle is None:
                return None
            info = self._call("get_job_info", handle)
        except Exception:  # a courtesy, like the logs: an unreachable cluster or a lost job says nothing
            return None
        node = self._node_address(info.driver_node_id) if getattr(info, "driver_node_id", None) else None
        url = f"{self.settings.ray_address.rstrip('/')}/#/jobs/{handle}"
        return JobInfo(id=handle, status=str(info.status.value), node=node, url=url)

    def _node_address(self, node_id: str) -> str:
        """A node's address (from Ray's state API, remembered: a node keeps its address), else its id."""
        if node_id not in self._nodes:
            try:
                from ray.util.state import list_nodes

                for node in list_nodes(address=self.settings.ray_address, timeout=10, raise_on_missing_output=False):
                    named = node.node_name and node.node_name != node.node_ip  # a host name, not the address again
                    self._nodes[node.node_id] = f"{node.node_ip} ({node.node_name})" if named else node.node_ip
            except Exception:
                return node_id[:12]
        return self._nodes.get(node_id, node_id[:12])

    def reattach(self, run: Run) -> str | None:
        assert run.id is not None
        handle = self.latest(run.id)
        if handle is not None and not self.poll(handle).ended:
            log.info("run %d: watching its Ray job %s again", run.id, handle)
        return handle

    def latest(self, run_id: int) -> str | None:
        """The submission id of the run's latest job on the cluster."""
        attempts = self._attempts(run_id)
        if not attempts:
            return None
        self._latest[run_id] = attempts[max(attempts)].submission_id
        return self._latest[run_id]


def gpus_to_ask(device: str, cluster_gpus: float) -> int:
    """GPUs a job asks Ray for: one for `cuda` (or `cuda:N`); one for `auto` when the cluster has any (else the
    job would get no GPU: Ray hides the GPUs from a job that asked for none); none for `cpu`."""
    if device.startswith("cuda"):
        return 1
    return 1 if device == "auto" and cluster_gpus > 0 else 0
