"""Alembic: the migrations build exactly the schema the models describe."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlmodel import SQLModel

import store.tables  # noqa: F401  (registers the tables)
from alembic import command
from app.config import Settings
from store.db import ALEMBIC_DIR, upgrade
from store.rollups import refresh_rollups
from store.tables import STEP_COLUMNS


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


# Revision 0006 made these nullable (rows an external script sends without them); at 0002 they were NOT NULL.
NOT_NULL_AT_0002 = {"epoch", "samples", "tokens", "lr", "wall_time", "step_time"}


def test_upgrade_backfills_the_rollups_of_recorded_steps(home: Path) -> None:
    """Revision 0003 sums up the rows already there in SQL: the same rollups as store.rollups writes."""
    settings = Settings()
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("sqlalchemy.url", settings.database_url)
    command.upgrade(config, "0002")
    rng = random.Random(4)

    def value(column: str) -> float | None:
        v = rng.choice([0.5, 1.0, rng.gauss(1, 0.1), None])  # ties and NULLs
        return 0.0 if v is None and column in NOT_NULL_AT_0002 else v

    columns = STEP_COLUMNS[: STEP_COLUMNS.index("step_time") + 1]  # the step columns as of revision 0003
    rows = [(run_id, step, *map(value, columns)) for run_id, n in ((1, 1000), (2, 20_000)) for step in range(1, n + 1)]
    with sqlite3.connect(settings.db_path) as conn:
        for run_id in (1, 2):
            conn.execute(
                "INSERT INTO runs (id, name, kind, status, model, dataset, learning_rate, batch_size, optimizer, "
                "config, created_at, steps_done) VALUES (?, 'r', 'train', 'completed', 'm', 'd', 0.1, 8, 'adamw', "
                "'{}', '2026-01-01 00:00:00.000000', 0)",
                (run_id,),
            )
        marks = ", ".join("?" * (len(columns) + 2))
        conn.executemany(f"INSERT INTO step_metrics (run_id, step, {', '.join(columns)}) VALUES ({marks})", rows)

    upgrade(settings.database_url)
    with sqlite3.connect(settings.db_path) as conn:
        query = "SELECT * FROM step_rollups WHERE run_id = ? ORDER BY level, block"
        for run_id in (1, 2):
            backfilled = conn.execute(query, (run_id,)).fetchall()
            refresh_rollups(conn, run_id)
            assert backfilled and conn.execute(query, (run_id,)).fetchall() == backfilled
