"""FastAPI dependencies: the app's settings, database sessions and connections, and the job runner.

Everything hangs off `app.state` (set by `app.main.create_app`), so two apps with different settings
can live in one process (the tests do that) and nothing reads the environment here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from sqlalchemy import Engine
from sqlmodel import Session

from app.config import Settings
from app.runner import JobRunner
from app.runner.executor import ClusterUnreachable

MAX_ID = 2**63 - 1  # SQLite's INTEGER range: larger ids cannot exist (and would overflow the driver)


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_session(request: Request, engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[Session]:
    """A session whose `info` says which model folders requests may name (see `app.services.check_api_model`)."""
    settings = get_app_settings(request)
    with Session(engine, info={"models_dir": settings.models_dir}) as session:
        yield session


def get_db(engine: Annotated[Engine, Depends(get_engine)]) -> Iterator[sqlite3.Connection]:
    """A pooled raw sqlite3 connection, for metric reads that must not pay for ORM objects."""
    proxy = engine.raw_connection()
    try:
        conn = proxy.driver_connection
        assert isinstance(conn, sqlite3.Connection)
        yield conn
    finally:
        proxy.close()


def get_runner(request: Request) -> JobRunner:
    runner: JobRunner = request.app.state.runner
    return runner


def executor_ready(runner: Annotated[JobRunner, Depends(get_runner)]) -> None:
    """503 with the reason when the executor cannot take jobs (STEPSCOPE_EXECUTOR=ray, cluster unreachable)."""
    try:
        runner.check_ready()
    except ClusterUnreachable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


ExecutorReady = Depends(executor_ready)
"""On routes that queue runs: a cluster that cannot be reached is a 503 now, not a run that never starts."""
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
DbDep = Annotated[sqlite3.Connection, Depends(get_db)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="The run's id")]
