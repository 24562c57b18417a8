"""The SQLite engine with its pragmas, and schema upgrades (Alembic) of the recorded data."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy import Engine, event
from sqlmodel import create_engine

ALEMBIC_DIR = Path(__file__).resolve().parent.parent / "alembic"
BUSY_TIMEOUT_MS = 30_000


def configure_sqlite(conn: sqlite3.Connection) -> None:
    """WAL lets readers run while a training job writes; the busy timeout makes writers queue, not fail."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")


def make_engine(database_url: str) -> Engine:
    engine = create_engine(database_url, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        configure_sqlite(dbapi_conn)

    return engine


def upgrade(database_url: str) -> None:
    """Bring the database to the newest Alembic revision (creating it if needed)."""
    from alembic.config import Config

    from alembic import command

    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.set_main_option("sqlalchemy.url", database_url)
    command.upgrade(cfg, "head")
