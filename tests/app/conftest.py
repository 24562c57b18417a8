"""Fixtures for the server's tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from app.config import Settings
from app.db import configure_sqlite


@pytest.fixture
def db(settings: Settings) -> Iterator[sqlite3.Connection]:
    """A raw connection to the test's migrated database, in autocommit mode, for writing rows directly."""
    conn = sqlite3.connect(settings.db_path, isolation_level=None)
    configure_sqlite(conn)
    yield conn
    conn.close()
