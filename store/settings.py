"""Where the recorded data lives: the data directory and the database, read from the environment.

The server's `app.config.Settings` extends this with its own settings; the training engine, which
runs without the server, reads only these (STEPSCOPE_HOME and STEPSCOPE_DATABASE_URL).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DataSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEPSCOPE_", extra="ignore")

    home: Path = Path("~/.stepscope")
    """Data directory: database, run folders, uploaded datasets, converted-model cache."""
    database_url: str = ""
    """SQLAlchemy URL of the SQLite database (default: HOME/stepscope.db)."""

    @model_validator(mode="after")
    def _resolve(self) -> DataSettings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'stepscope.db'}"
        return self

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"

    @property
    def db_path(self) -> Path:
        """Filesystem path of the SQLite database."""
        from sqlalchemy.engine import make_url

        database = make_url(self.database_url).database
        if not database:
            raise ValueError("STEPSCOPE_DATABASE_URL must name an SQLite file")
        return Path(database)
