"""All the server's settings in one place, read from the environment with the prefix STEPSCOPE_.

`Settings` extends the data settings the training engine reads too (`store.settings.DataSettings`:
HOME and DATABASE_URL) with the server's own.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from store.settings import DataSettings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(DataSettings):
    host: str = "127.0.0.1"
    """Address to listen on; any other than a loopback address needs TOKEN (refused at construction)."""
    port: int = 8000
    token: str = ""
    """Bearer token for state-changing API calls (required when HOST is not a loopback address)."""
    allowed_hosts: Annotated[list[str], NoDecode] = []
    """Host names requests may be addressed to besides loopback names and HOST (comma-separated; `*`: any)."""
    session_days: float = Field(default=30, gt=0)
    """Days a dashboard sign-in (its cookie) lasts."""
    models_dir: Path | None = None
    """Folder of local models the API may train (default HOME/models); the CLI takes any folder."""
    max_concurrent_runs: int = 0
    """Training jobs running at once (0: one per GPU, or 1 on CPU)."""
    max_upload_bytes: int = 50 * 1024 * 1024
    cancel_grace_seconds: float = 15.0
    """Seconds a cancelled job gets to flush and save before it is killed."""
    resume_interrupted: bool = False
    """At start, resume every interrupted run (a shutdown or a crash stopped it) from its last checkpoint."""
    executor: Literal["local", "ray"] = "local"
    """Where jobs run: `local` (subprocesses of this server) or `ray` (Ray jobs on the cluster at RAY_ADDRESS)."""
    ray_address: str = "http://127.0.0.1:8265"
    """The Ray cluster's dashboard address, which serves the Jobs API (with EXECUTOR=ray)."""
    server_url: str = ""
    """The address Ray jobs reach this server at to record their rows (default http://HOST:PORT)."""
    generate_memory_mb: float = Field(default=2048, gt=0)
    """Memory for the models /api/generate keeps loaded (base models and run adapters; least recently used out)."""
    generate_threads: int = Field(default=2, ge=1, le=1024)
    """CPU threads the server's own generation uses (/api/generate, the playground); training jobs are not affected."""

    @property
    def reachable_url(self) -> str:
        """Where a job on a Ray worker sends its rows (app.runner.ray_jobs)."""
        if self.server_url:
            return self.server_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        """STEPSCOPE_ALLOWED_HOSTS=a.example,b.example (or a list, from code): lower-case names."""
        names = value.split(",") if isinstance(value, str) else value
        if isinstance(names, list | tuple):
            return [str(name).strip().lower() for name in names if str(name).strip()]
        return value

    @model_validator(mode="after")
    def _safe_to_serve(self) -> Settings:
        """Refuse a non-loopback address without a token, however the app is started (CLI, uvicorn --factory)."""
        if not _is_loopback(self.host) and not self.token:
            raise ValueError(f"STEPSCOPE_HOST={self.host} is not a loopback address: set STEPSCOPE_TOKEN too")
        # An absolute path, not resolved: a model folder may be a link the owner put there on purpose.
        self.models_dir = Path(self.models_dir or self.home.expanduser().resolve() / "models").expanduser().absolute()
        return self

    @cached_property
    def is_public(self) -> bool:
        return not _is_loopback(self.host)


def get_settings() -> Settings:
    """Fresh settings from the current environment (tests change STEPSCOPE_HOME between cases)."""
    return Settings()
