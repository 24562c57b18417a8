"""Shared fixtures: every test gets its own STEPSCOPE_HOME (database, run folders, caches)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.db import upgrade


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh data directory, exported so that subprocesses (training jobs) use it too."""
    monkeypatch.setenv("STEPSCOPE_HOME", str(tmp_path))
    monkeypatch.delenv("STEPSCOPE_DATABASE_URL", raising=False)
    yield tmp_path


@pytest.fixture
def settings(home: Path) -> Settings:
    """Settings for the temporary home, with the database already migrated."""
    s = Settings()
    upgrade(s.database_url)
    return s
