"""A run's adapter merged into its base model (`python -m trainer.merge RUN_ID`): where it goes and the state
file the job writes and the server reads.

Everything lives in the run's folder, `runs/ID/merged/`: `state.json` (status, stage, progress, error, the
job's pid and start time), the job's log, and `model/` (what `save_pretrained` wrote) once it is done. A file
rather than a table: the merge belongs to the run's folder like its adapter, it goes when the run is deleted,
and nothing queries across runs. The state is replaced atomically (written beside, then renamed), so a reader
never sees half of it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

MERGED_DIR = "merged"
STATE_FILE = "state.json"
MODEL_DIR = "model"
"""The merged model's folder inside MERGED_DIR (written as MODEL_DIR + '.partial' and renamed when complete)."""
LOG_FILE = "merge.log"
ADAPTER_DIR = "adapter"  # trainer.loop.save_adapter's folder in the run's folder
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft's save_pretrained writes

STAGES = {"loading": 0.0, "merging": 0.5, "saving": 0.6}
"""The job's stages and the progress each starts at: loading the base model (reading its weights from disk, the
longest part for a large model) takes about half, the merge itself little, writing the rest."""


def merged_dir(run_dir: Path) -> Path:
    return run_dir / MERGED_DIR


def has_adapter(run_dir: Path) -> bool:
    return all((run_dir / ADAPTER_DIR / name).is_file() for name in ADAPTER_FILES)


def adapter_stamp(run_dir: Path) -> list[int]:
    """The saved adapter's weights file's size and modification time: a resumed run saves a new adapter, and a
    merge of the old one no longer stands for the run."""
    info = (run_dir / ADAPTER_DIR / ADAPTER_FILES[1]).stat()
    return [info.st_size, info.st_mtime_ns]


def read_state(run_dir: Path) -> dict[str, Any] | None:
    """The merge's state, or None when none was asked for (or its file is unreadable)."""
    try:
        state = json.loads((merged_dir(run_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_state(run_dir: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Replace the state file atomically. The folder must exist: a job whose run was deleted meanwhile fails
    here rather than bring the folder back."""
    folder = merged_dir(run_dir)
    staging = folder / f".{STATE_FILE}.{os.getpid()}"
    staging.write_text(json.dumps({**state, "updated_at": time.time()}))
    os.replace(staging, folder / STATE_FILE)
    return state
