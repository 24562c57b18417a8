"""Past one machine: a real three-node Ray cluster on this machine. The head takes no jobs; two worker nodes
take one each and keep their files in a data directory of their own (STEPSCOPE_JOB_HOME), as nodes without a
shared filesystem do, so each job sends its run's files to the server over HTTP. A sweep's two runs go one to
each node; one node dies (every process of it killed, as when a machine is lost): its run ends `interrupted`
while the other completes; resumed, it fetches its checkpoint from the server and goes on, on the node that
is left, each step recorded once. The server ends with every run's adapter, checkpoints and snapshots."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import serve
from tests.conftest import free_port, wait_for
from tests.ray.conftest import call, ended, ray_cluster, ray_jobs, ray_node, steps

pytestmark = pytest.mark.ray

TINY = {"model": "tiny-random-llama", "dataset": "synthetic-lookup", "eval_every": 25}


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, str, Path]]:
    with ray_cluster(cpus=0) as cluster:  # the jobs' supervisors go where their CPU is: the worker nodes
        yield cluster


@contextlib.contextmanager
def worker_node(head: tuple[str, str, Path], name: str, home: Path) -> Iterator[tuple[Any, str]]:
    """A worker node with one CPU joined to the head, its jobs' files in `home`: (its `ray start`, its node id)."""
    url, gcs, temp = head
    ports = [free_port() for _ in range(6)]
    workers = ",".join(str(free_port()) for _ in range(12))  # the head's workers take Ray's default range
    args = [
        "--address", gcs, "--num-cpus", "1", "--node-manager-port", str(ports[0]),
        "--object-manager-port", str(ports[1]), "--dashboard-agent-listen-port", str(ports[2]),
        "--dashboard-agent-grpc-port", str(ports[3]), "--runtime-env-agent-port", str(ports[4]),
        "--metrics-export-port", str(ports[5]), "--worker-port-list", workers,
    ]  # fmt: skip
    before = set(alive_nodes(url))
    with ray_node(args, temp, name, env={"STEPSCOPE_JOB_HOME": str(home)}) as node:
        (node_id,) = wait_for(lambda: set(alive_nodes(url)) - before, timeout=60, what=f"node {name} to join")
        yield node, node_id


def alive_nodes(url: str) -> list[str]:
    from ray.util.state import list_nodes

    return [n.node_id for n in list_nodes(address=url, raise_on_missing_output=False) if n.state == "ALIVE"]


def kill_node(node: Any) -> None:
    """SIGKILL to the node's every process (raylet, agents, job supervisors and the jobs they started, which
    run in sessions of their own): what a lost machine does to them."""
    import psutil

    root = psutil.Process(node.pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    node.wait(timeout=30)


def test_a_sweep_spreads_over_the_nodes_and_a_lost_node_s_run_resumes_on_another(
    head: tuple[str, str, Path], tmp_path: Path
) -> None:
    from ray.job_submission import JobSubmissionClient

    url = head[0]
    home, home_a, home_b = tmp_path / "server", tmp_path / "node-a", tmp_path / "node-b"
    home.mkdir()
    with (
        worker_node(head, "node-a", home_a) as (node_a, node_a_id),
        worker_node(head, "node-b", home_b) as (_, node_b_id),
        serve(home, executor="ray", ray_address=url) as server,
    ):
        config = TINY | {"max_steps": 300, "checkpoint_every": 10}
        status, sweep = call(server, "POST", "/api/sweeps", {"config": config, "learning_rates": [1e-3, 1e-2]})
        assert status == 201, sweep
        ids = [r["id"] for r in sweep["runs"]]

        def placed() -> dict[int, str] | None:  # run id -> the node its job runs on
            jobs = {i: ray_jobs(server, url, i) for i in ids}
            nodes = {i: j[0].driver_node_id for i, j in jobs.items() if len(j) == 1 and j[0].driver_node_id}
            return nodes if len(nodes) == len(ids) else None

        nodes = wait_for(placed, timeout=120, what="both jobs to be placed")
        assert sorted(nodes.values()) == sorted([node_a_id, node_b_id])  # one job on each worker node
        (lost,) = [i for i, node in nodes.items() if node == node_a_id]
        (kept,) = [i for i in ids if i != lost]
        # Node A's checkpoint, once the server has it too (sent after the rows before it).
        on_server = home / "runs" / str(lost) / "checkpoints"
        wait_for(lambda: any(on_server.glob("step-*/state.pt")), timeout=180, what="a checkpoint on the server")
        assert any((home_a / "runs" / str(lost) / "checkpoints").glob("step-*/state.pt"))

        kill_node(node_a)
        done = ended(server, lost, timeout=120)  # Ray notices the lost node's job supervisor (~20 s here)
        assert done["status"] == "interrupted", done
        assert "Ray job" in done["error"] and "died" in done["error"]
        recorded = steps(server.db, lost)
        assert 10 <= len(recorded) < 300 and recorded == list(range(1, len(recorded) + 1))

        other = ended(server, kept, timeout=300)  # node B's run never noticed
        assert other["status"] == "completed", other["error"]
        assert steps(server.db, kept) == list(range(1, 301))

        assert call(server, "POST", f"/api/runs/{lost}/resume")[0] == 200
        done = ended(server, lost, timeout=300)
        assert done["status"] == "completed", done["error"]
        assert steps(server.db, lost) == list(range(1, 301)) and done["summary"] is not None
        attempts = sorted(ray_jobs(server, url, lost), key=lambda j: j.submission_id)
        assert [j.submission_id.rsplit("-", 1)[1] for j in attempts] == ["1", "2"]
        assert attempts[1].driver_node_id == node_b_id  # the node that is left
        log = JobSubmissionClient(url).get_job_logs(attempts[1].submission_id)
        assert "fetched checkpoint" in log and "resuming after step" in log  # node B had none of its own

    for run_id, node_home in ((kept, home_b), (lost, home_b)):  # what the server reads, sent by the nodes
        run_dir, sent = node_home / "runs" / str(run_id), home / "runs" / str(run_id)
        for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "snapshots.pt"):
            assert (sent / name).read_bytes() == (run_dir / name).read_bytes(), (run_id, name)
        assert sorted(p.name for p in (sent / "checkpoints").iterdir()) == sorted(
            p.name for p in (run_dir / "checkpoints").iterdir()
        )  # the newest two, the same steps
