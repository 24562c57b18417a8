"""All the server's settings in one place, read from the environment with the prefix STEPSCOPE_.

`Settings` extends the data settings the training engine reads too (`store.settings.DataSettings`:
HOME and DATABASE_URL) with the server's own.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property

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
    port: int = 8000
    token: str = ""
    """Bearer token for state-changing API calls (required when HOST is not a loopback address)."""
    max_concurrent_runs: int = 0
    """Training jobs running at once (0: one per GPU, or 1 on CPU)."""
    max_upload_bytes: int = 50 * 1024 * 1024
    cancel_grace_seconds: float = 15.0
    """Seconds a cancelled job gets to flush and save before it is killed."""

    @cached_property
    def is_public(self) -> bool:
        return not _is_loopback(self.host)

    def check_safe_to_serve(self) -> None:
        """Refuse to listen on a non-loopback address without a token."""
        if self.is_public and not self.token:
            raise ValueError(f"STEPSCOPE_HOST={self.host} is not a loopback address: set STEPSCOPE_TOKEN too")


def get_settings() -> Settings:
    """Fresh settings from the current environment (tests change STEPSCOPE_HOME between cases)."""
    return Settings()
