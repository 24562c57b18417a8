"""How many GPUs a Ray job asks for, from the run's device and the GPUs the cluster reports (plain data: no
cluster needed; tests/ray reads a real cluster's resources)."""

from __future__ import annotations

import pytest

from app.runner.ray_jobs import gpus_to_ask


@pytest.mark.parametrize(
    ("device", "cluster_gpus", "asked"),
    [
        ("auto", 0, 0),  # a CPU cluster: asking for a GPU would leave the job pending for ever
        ("auto", 4, 1),  # Ray hides every GPU from a job that asked for none: auto would train on the CPU
        ("cuda", 0, 1),  # asked for by name: the job waits for a GPU node to join
        ("cuda", 2, 1),
        ("cuda:1", 2, 1),
        ("cpu", 8, 0),
    ],
)
def test_a_job_asks_for_a_gpu_when_its_device_may_use_one_the_cluster_has(
    device: str, cluster_gpus: float, asked: int
) -> None:
    assert gpus_to_ask(device, cluster_gpus) == asked
