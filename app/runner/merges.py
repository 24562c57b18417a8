"""Merge jobs (trainer.merge): started as processes of the server's machine, watched through their state file.

A merge reads the run's adapter from its folder and writes the merged model beside it, so it runs where the
server's STEPSCOPE_HOME is, whichever executor trained the run (as loss maps do, `app.runner.maps`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.config import Settings
from app.runner.maps import START_GRACE
from app.runner.processes import is_same_process
from store.merges import LOG_FILE, MODEL_DIR, adapter_stamp, merged_dir, read_state, write_state


def start_merge(settings: Settings, run_id: int) -> dict[str, Any]:
    """Queue the run's merge and start its process; it records its own stages, result or error."""
    run_dir = settings.runs_dir / str(run_id)
    merged_dir(run_dir).mkdir(parents=True, exist_ok=True)
    state = write_state(run_dir, {"status": "queued", "created_at": time.time(), "adapter": adapter_stamp(run_dir)})
    env = os.environ | {"STEPSCOPE_HOME": str(settings.home), "STEPSCOPE_DATABASE_URL": settings.database_url}
    with (merged_dir(run_dir) / LOG_FILE).open("ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "trainer.merge", str(run_id)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
    return state


def merge_state(run_dir: Path) -> dict[str, Any] | None:
    """The run's merge as it stands, or None when there is none to show: never asked for, or made from an
    adapter the run has since replaced (a resumed run saves a new one), or its folder gone. A merge whose
    process is gone without a result (killed, or the machine restarted) is `failed`."""
    state = read_state(run_dir)
    if state is None:
        return None
    status = state.get("status")
    try:
        current = adapter_stamp(run_dir)
    except OSError:
        current = None
    if state.get("adapter") != current or (status == "completed" and not (merged_dir(run_dir) / MODEL_DIR).is_dir()):
        return None
    gone = None
    if status == "running" and not is_same_process(state.get("pid"), state.get("pid_start")):
        gone = "its process ended without a result"
    elif status == "queued" and time.time() - float(state.get("created_at") or 0) > START_GRACE.total_seconds():
        gone = "its process never started"
    if gone is not None:
        state = write_state(run_dir, state | {"status": "failed", "error": f"The merge failed: {gone}."})
    return state
