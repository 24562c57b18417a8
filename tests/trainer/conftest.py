"""Helpers for trainer tests: run the real `stepscope train` entry point in-process and read the rows back."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from store.tables import STEP_COLUMNS
from trainer.cli import main

TINY = ["--model", "tiny-random-llama", "--dataset", "synthetic-arithmetic"]


def train(*args: str) -> int:
    """Run `stepscope train` with the tiny model; returns the exit status."""
    return main([*TINY, *args])


def steps(home: Path, run_id: int = 1) -> list[dict[str, Any]]:
    with sqlite3.connect(home / "stepscope.db") as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            f"SELECT step, {', '.join(STEP_COLUMNS)} FROM step_metrics WHERE run_id = ? ORDER BY step", (run_id,)
        ).fetchall()
    return [dict(r) for r in rows]


def run_row(home: Path, run_id: int = 1) -> dict[str, Any]:
    with sqlite3.connect(home / "stepscope.db") as conn:
        conn.row_factory = sqlite3.Row
        return dict(conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone())


@pytest.fixture
def trained(home: Path):  # type: ignore[no-untyped-def]
    """Call as trained(*flags) -> (exit status, run row, step rows)."""

    def _run(*args: str):  # type: ignore[no-untyped-def]
        code = train(*args)
        with sqlite3.connect(home / "stepscope.db") as conn:
            run_id = conn.execute("SELECT max(id) FROM runs").fetchone()[0]
        return code, run_row(home, run_id), steps(home, run_id)

    return _run
