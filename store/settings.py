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


HOME_ID_FILE = "server-id"
"""A random name for a data directory, written by the server that uses it: a job elsewhere (a Ray worker)
that finds the same name in its STEPSCOPE_HOME shares the server's files (one machine, or a shared
filesystem); one that does not sends its files to the server over HTTP."""


def home_id(home: Path) -> str:
    """The data directory's name, made (atomically) the first time it is asked for."""
    path = home / HOME_ID_FILE
    if not path.exists():
        import os
        import secrets

        home.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{HOME_ID_FILE}.{os.getpid()}")
        part.write_text(secrets.token_hex(16))
        try:
            os.link(part, path)  # never replaces one another process made meanwhile
        except FileExistsError:
            pass
        finally:
            part.unlink()
    return path.read_text().strip()


def shares_home(home: Path, server_id: str | None) -> bool:
    """Whether `home` is the data directory of the server whose home_id is `server_id`."""
    try:
        return server_id is not None and (home / HOME_ID_FILE).read_text().strip() == server_id
    except OSError:
        return False
