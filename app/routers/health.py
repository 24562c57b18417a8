"""/api/health: is the server up, and what is its job runner doing."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from pydantic import BaseModel

from app.deps import RunnerDep

# No token here even on a public address: a liveness probe must work, and this reveals nothing.
router = APIRouter(prefix="/api/health", tags=["health"])


class RunnerHealth(BaseModel):
    active: bool
    """False when another server owns this data directory's jobs (or the runner is switched off)."""
    jobs: int
    max_concurrent_runs: int
    gpus: list[str] | None
    """GPUs jobs are spread over (None until the first job starts)."""


class Health(BaseModel):
    status: str
    version: str
    runner: RunnerHealth
    runs: dict[str, int]
    """How many runs there are in each status."""


def _version() -> str:
    try:
        return version("stepscope")
    except PackageNotFoundError:
        return "unknown"


@router.get("", response_model=Health)
def health(runner: RunnerDep) -> Health:
    return Health(
        status="ok",
        version=_version(),
        runner=RunnerHealth(
            active=runner.active,
            jobs=len(runner.jobs),
            max_concurrent_runs=runner.max_concurrent,
            gpus=runner.gpus,
        ),
        runs=runner.counts(),
    )
