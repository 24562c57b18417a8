"""Alembic: the migrations build exactly the schema the models describe."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlmodel import SQLModel

import app.models  # noqa: F401  (registers the tables)
from app.config import Settings
from app.db import ALEMBIC_DIR, upgrade


def test_autogenerate_finds_no_difference_between_models_and_migrations(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"render_as_batch": True})
            diff = compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"the models changed without a migration (alembic revision --autogenerate): {diff}"


def test_upgrade_is_idempotent_and_keeps_data(settings: Settings) -> None:
    with sqlite3.connect(settings.db_path) as conn:
        conn.execute(
            "INSERT INTO sweeps (name, created_at, base_config, learning_rates) VALUES ('s', '2026', '{}', '[]')"
        )
    upgrade(settings.database_url)
    with sqlite3.connect(settings.db_path) as conn:
        assert conn.execute("SELECT name FROM sweeps").fetchall() == [("s",)]
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert version == ScriptDirectory(str(ALEMBIC_DIR)).get_current_head()
    assert {"runs", "step_metrics", "eval_metrics", "sweeps", "datasets"} <= tables


def test_stepscope_db_upgrade_creates_the_database(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    assert main(["db", "upgrade"]) == 0
    assert "newest schema" in capsys.readouterr().out
    with sqlite3.connect(home / "stepscope.db") as conn:
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert version == ScriptDirectory(str(ALEMBIC_DIR)).get_current_head()
