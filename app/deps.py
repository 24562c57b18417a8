"""FastAPI dependencies: the app's settings, database sessions and connections, and the job runner.

Everything hangs off `app.state` (set by `app.main.create_app`), so two apps with different settings
can live in one process (the tests do that) and nothing reads the environment here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy import Engine
from sqlmodel import Session

from app.config import Settings
from app.runner import JobRunner

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


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
DbDep = Annotated[sqlite3.Connection, Depends(get_db)]
RunnerDep = Annotated[JobRunner, Depends(get_runner)]
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="The run's id")]
