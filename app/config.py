"""All settings in one place, read from the environment with the prefix STEPSCOPE_."""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEPSCOPE_", extra="ignore")

    home: Path = Path("~/.stepscope")
    """Data directory: database, run folders, uploaded datasets, converted-model cache."""
    database_url: str = ""
    """SQLAlchemy URL of the SQLite database (default: HOME/stepscope.db)."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str = ""
    """Bearer token for state-changing API calls (required when HOST is not a loopback address)."""
    max_concurrent_runs: int = 0
    """Training jobs running at once (0: one per GPU, or 1 on CPU)."""
    max_upload_bytes: int = 50 * 1024 * 1024
    cancel_grace_seconds: float = 15.0
    """Seconds a cancelled job gets to flush and save before it is killed."""

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'stepscope.db'}"
        return self

    @cached_property
    def is_public(self) -> bool:
        return not _is_loopback(self.host)

    def check_safe_to_serve(self) -> None:
        """Refuse to listen on a non-loopback address without a token."""
        if self.is_public and not self.token:
            raise ValueError(f"STEPSCOPE_HOST={self.host} is not a loopback address: set STEPSCOPE_TOKEN too")

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


def get_settings() -> Settings:
    """Fresh settings from the current environment (tests change STEPSCOPE_HOME between cases)."""
    return Settings()


settings = get_settings()
