"""Loss-map jobs (trainer.maps): started as processes of the server's machine, watched through their row.

A map reads the runs' weight snapshots from their folders, so it runs where the server's STEPSCOPE_HOME
is, whichever executor trains the runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

from sqlmodel import Session

from app.config import Settings
from app.runner.processes import is_same_process
from app.runner.recovery import _aware
from store.tables import LossMap, utcnow

START_GRACE = timedelta(seconds=60)
"""A map still `queued` this long after it was asked for never started (its process failed to import, or the
server stopped first)."""


def start_map(settings: Settings, map_id: int) -> None:
    """Start the map's process; it records its own progress, result or error in its row."""
    log_dir = settings.home / "maps"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"STEPSCOPE_HOME": str(settings.home), "STEPSCOPE_DATABASE_URL": settings.database_url}
    with (log_dir / f"{map_id}.log").open("ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "trainer.maps", str(map_id)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip


def settle_if_gone(session: Session, loss_map: LossMap) -> LossMap:
    """A map whose process is gone without a result (killed, or the machine restarted) is `failed`."""
    gone = None
    if loss_map.status == "running" and not is_same_process(loss_map.pid, loss_map.pid_start):
        gone = "its process ended without a result"
    elif loss_map.status == "queued" and utcnow() - _aware(loss_map.created_at) > START_GRACE:
        gone = "its process never started"
    if gone is not None:
        loss_map.status, loss_map.error, loss_map.finished_at = "failed", f"The map failed: {gone}.", utcnow()
        session.add(loss_map)
        session.commit()
        session.refresh(loss_map)
    return loss_map
