"""Runs and sweeps on a real local Ray cluster (STEPSCOPE_EXECUTOR=ray), each job recording over HTTP into a
real `stepscope serve` process: a sweep completes (Ray queueing what does not fit), a range test suggests a
rate, a cancel stops its Ray job, a killed worker leaves its run interrupted, a server restart re-attaches
to the running job, a cluster that is down gives 503, and a run's log is its Ray job's."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from store.db import make_engine, upgrade
from tests.browser.conftest import Page, Server, serve
from tests.conftest import free_port, wait_for
from tests.ray.conftest import call, ended, finished_job, pid_of, ray_jobs, run, steps

pytestmark = pytest.mark.ray

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-lookup", "eval_every": 25, "checkpoint_every": 0}
LONG = TINY | {"max_steps": 5000}


@pytest.fixture(scope="module")
def ray_server(ray_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("ray-home"), executor="ray", ray_address=ray_address) as server:
        yield server


def test_a_sweep_runs_through_ray_and_records_every_step_over_http(ray_server: Server, ray_address: str) -> None:
    status, sweep = call(
        ray_server, "POST", "/api/sweeps", {"config": TINY | {"max_steps": 50}, "learning_rates": [1e-4, 1e-3, 1e-2]}
    )
    assert status == 201, sweep
    ids = [r["id"] for r in sweep["runs"]]
    runs, jobs = [], []
    for run_id in ids:
        done = ended(ray_server, run_id)
        assert done["status"] == "completed", done["error"]
        assert done["steps_done"] == 50 and done["total_steps"] == 50 and done["summary"] is not None
        assert steps(ray_server.db, run_id) == list(range(1, 51))  # every step, once
        job = finished_job(ray_server, ray_address, run_id)
        assert job.status.value == "SUCCEEDED" and f"--run-id {run_id} --server {ray_server.url}" in job.entrypoint
        assert job.metadata["stepscope_run"] == str(run_id)
        runs.append(done)
        jobs.append(job)
    # Ray queued them, not stepscope: all three were submitted before any run ended, and with two CPUs and one
    # asked per job, the last to train started only after one of the others had ended.
    starts = sorted((moment(r["started_at"]), i) for i, r in enumerate(runs))
    first_end = min(moment(r["finished_at"]) for r in runs)
    assert max(j.start_time for j in jobs) / 1000 < first_end  # Ray's submission times, in ms
    last = runs[starts[-1][1]]
    assert moment(last["started_at"]) > min(moment(r["finished_at"]) for r in runs if r is not last)


def moment(iso: str) -> float:
    """A run's time from the API (UTC, maybe without its zone) as a Unix timestamp."""
    stamp = datetime.fromisoformat(iso)
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def test_a_range_test_runs_through_ray_and_suggests_a_rate(ray_server: Server, ray_address: str) -> None:
    status, created = call(
        ray_server, "POST", "/api/lr-range-tests", {"config": TINY, "min_lr": 1e-6, "max_lr": 1.0, "num_steps": 60}
    )
    assert status == 201, created
    done = ended(ray_server, created["id"])
    assert done["status"] == "completed", done["error"]
    assert finished_job(ray_server, ray_address, created["id"]).status.value == "SUCCEEDED"
    status, summary = call(ray_server, "GET", f"/api/runs/{created['id']}/summary")
    assert status == 200 and 1e-6 < summary["range_test"]["suggested_lr"] < 1.0
    assert len(summary["range_test"]["sweep_lrs"]) == 5


def test_the_run_s_log_is_its_ray_job_s_log(ray_server: Server, ray_address: str) -> None:
    from ray.job_submission import JobSubmissionClient

    status, created = call(ray_server, "POST", "/api/runs", TINY | {"max_steps": 10})
    assert status == 201, created
    run_id = created["id"]
    assert ended(ray_server, run_id)["status"] == "completed"
    job = finished_job(ray_server, ray_address, run_id)
    assert job.metadata["stepscope_gpus"] == "0"  # device auto on a cluster without GPUs: none asked for

    status, logs = call(ray_server, "GET", f"/api/runs/{run_id}/logs?tail=5")
    assert status == 200 and logs["executor"] == "ray"
    printed = [line.rstrip() for line in JobSubmissionClient(ray_address).get_job_logs(job.submission_id).split("\n")]
    assert logs["lines"] == [line for line in printed if line][-5:] and len(logs["lines"]) == 5
    status, logs = call(ray_server, "GET", f"/api/runs/{run_id}/logs")
    assert any("training examples" in line for line in logs["lines"])  # the trainer's own log, through Ray
    from ray.util.state import list_nodes

    (node,) = list_nodes(address=ray_address)
    url = f"{ray_address}/#/jobs/{job.submission_id}"  # the job's page on Ray's dashboard
    assert logs["job"] == {"id": job.submission_id, "status": "SUCCEEDED", "node": node.node_ip, "url": url}
    assert call(ray_server, "GET", f"/api/runs/{run_id}/logs?tail=0")[0] == 422


@pytest.fixture(scope="module")
def server(ray_server: Server) -> Server:
    """The browser page's server (tests.browser.conftest.page): the Ray one."""
    return ray_server


def test_the_run_page_s_log_names_its_ray_job(page: Page, ray_server: Server, ray_address: str) -> None:
    status, created = call(ray_server, "POST", "/api/runs", TINY | {"max_steps": 5})
    assert status == 201, created
    assert ended(ray_server, created["id"])["status"] == "completed"
    job = finished_job(ray_server, ray_address, created["id"])
    page.goto(f"/runs/{created['id']}")
    page.page.click("#job-log summary")
    page.page.wait_for_selector("#job-log[data-loaded='true'] #job-log-job")
    note = page.page.text_content("#job-log-note") or ""
    assert note.startswith("(last ") and f"lines of Ray job {job.submission_id} · SUCCEEDED · on " in note
    assert page.page.get_attribute("#job-log-job", "href") == f"{ray_address}/#/jobs/{job.submission_id}"


def test_the_cluster_s_resources_are_read(ray_address: str, tmp_path: Path) -> None:
    from app.config import Settings
    from app.runner.ray_jobs import RayExecutor

    resources = RayExecutor(Settings(home=tmp_path, executor="ray", ray_address=ray_address)).cluster_resources()
    assert resources["CPU"] == 2 and resources.get("GPU", 0) == 0  # `ray start --num-cpus 2 --num-gpus 0`


def test_cancel_stops_the_ray_job_and_the_run_keeps_its_rows(ray_server: Server, ray_address: str) -> None:
    status, created = call(ray_server, "POST", "/api/runs", LONG)
    assert status == 201, created
    run_id = created["id"]
    wait_for(lambda: len(steps(ray_server.db, run_id)) >= 3, timeout=120, what="steps")
    assert call(ray_server, "POST", f"/api/runs/{run_id}/cancel")[0] == 200
    done = ended(ray_server, run_id, timeout=60)
    assert done["status"] == "cancelled"
    assert len(steps(ray_server.db, run_id)) >= 3
    assert finished_job(ray_server, ray_address, run_id).status.value == "STOPPED"


def test_a_killed_worker_leaves_its_run_interrupted_and_it_resumes(ray_server: Server, ray_address: str) -> None:
    status, created = call(ray_server, "POST", "/api/runs", TINY | {"max_steps": 300, "checkpoint_every": 10})
    assert status == 201, created
    run_id = created["id"]
    checkpoints = ray_server.home / "runs" / str(run_id) / "checkpoints"
    # A whole checkpoint (a `.saving-` folder is one being written, renamed into place when complete).
    wait_for(lambda: any(checkpoints.glob("step-*/state.pt")), timeout=120, what="a checkpoint")
    pid = pid_of(ray_server.db, run_id)  # the job's own process (it records its pid as it starts)
    assert pid and pid != ray_server.process.pid
    os.kill(pid, signal.SIGKILL)
    done = ended(ray_server, run_id, timeout=60)
    assert done["status"] == "interrupted", done
    assert "Ray job" in done["error"]
    # Resumed: a second Ray job goes on from the checkpoint (its history read back over HTTP), each step once.
    assert call(ray_server, "POST", f"/api/runs/{run_id}/resume")[0] == 200
    done = ended(ray_server, run_id)
    assert done["status"] == "completed", done["error"]
    assert steps(ray_server.db, run_id) == list(range(1, 301)) and done["summary"] is not None
    attempts = sorted(j.submission_id for j in ray_jobs(ray_server, ray_address, run_id))
    assert [a.rsplit("-", 1)[1] for a in attempts] == ["1", "2"]
    from ray.job_submission import JobSubmissionClient

    assert "resuming after step" in JobSubmissionClient(ray_address).get_job_logs(attempts[1])


def test_a_restarted_server_reattaches_to_the_running_job(ray_address: str, tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    home.mkdir()
    with serve(home, port, executor="ray", ray_address=ray_address) as first:
        status, created = call(first, "POST", "/api/runs", TINY | {"max_steps": 300})
        assert status == 201, created
        run_id = created["id"]
        wait_for(lambda: len(steps(first.db, run_id)) >= 3, timeout=120, what="steps")
    # The job trains on while no server answers: its recorder keeps the requests and sends them later.
    with serve(home, port, executor="ray", ray_address=ray_address) as second:
        assert run(second, run_id)["status"] in ("running", "completed")  # its last rows may be in already
        done = ended(second, run_id)
        assert done["status"] == "completed", done["error"]
        assert steps(second.db, run_id) == list(range(1, 301))  # each step once
        assert finished_job(second, ray_address, run_id).status.value == "SUCCEEDED"  # the one attempt: not resubmitted
        assert "watching its Ray job" in (home / "server.log").read_text()


def test_a_cluster_that_cannot_be_reached_is_a_503_and_queued_runs_wait(tmp_path: Path) -> None:
    pytest.importorskip("ray.job_submission")
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'stepscope.db'}"
    upgrade(url)
    from sqlmodel import Session

    from app.services import create_run
    from trainer.config import TrainConfig

    engine = make_engine(url)
    with Session(engine) as session:
        queued = create_run(session, TrainConfig(**TINY, max_steps=5)).id
    engine.dispose()
    dead = f"http://127.0.0.1:{free_port()}"
    with serve(home, executor="ray", ray_address=dead) as server:
        status, body = call(server, "POST", "/api/runs", TINY | {"max_steps": 5})
        assert status == 503 and "cannot be reached" in body["detail"] and dead in body["detail"]
        status, body = call(server, "POST", "/api/sweeps", {"config": TINY, "learning_rates": [1e-3, 1e-2]})
        assert status == 503
        wait_for(lambda: "cannot be reached" in (home / "server.log").read_text(), timeout=30, what="a poll")
        assert run(server, queued)["status"] == "queued" and pid_of(server.db, queued) is None
