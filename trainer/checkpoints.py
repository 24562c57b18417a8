"""Checkpoints: all a run needs to go on from a step as if it had never stopped.

Every `checkpoint_every` steps, and at least every CHECKPOINT_SECONDS, the loop saves the trainable
(LoRA) weights, the optimizer's, schedule's and loss scaler's state, the random generators, the last
update (the next step's gradient alignment needs it), the step and the sample and token counts. The
data order needs no saving: each epoch's order follows from the seed, so a resumed run skips the
batches it already trained on. A checkpoint is written to a temporary folder and renamed into place,
so a kill at any moment leaves the previous one whole; the last CHECKPOINT_KEEP are kept.

Before saving, the loop has every row up to the step written (`Recorder.flush`), so a resumed run
starts right after rows that are all there; the rows a killed run recorded after its checkpoint are
written again by the resumed run (`INSERT OR REPLACE`), each step once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINT_SECONDS = 600.0  # 10 minutes: a slow run's checkpoints are never further apart
CHECKPOINT_KEEP = 2
CHECKPOINT_FOLDER = "checkpoints"
PREFIX = "step-"
STATE_FILE = "state.pt"


@dataclass
class Resumed:
    """Where a resumed run goes on from."""

    step: int
    samples: int
    tokens: int
    wall_time: float


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_FOLDER


def latest(run_dir: Path) -> Path | None:
    """The newest whole checkpoint of a run, or None."""
    folder = checkpoint_dir(run_dir)
    found = sorted(folder.glob(f"{PREFIX}*/{STATE_FILE}")) if folder.is_dir() else []
    return found[-1].parent if found else None


def save(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write `state` (with its `step`) as the run's newest checkpoint, atomically; drop the oldest beyond KEEP."""
    import torch  # here, not above: the server places checkpoints that came over HTTP without loading torch

    return place(run_dir, state["step"], lambda path: torch.save(state, path))


def place(run_dir: Path, step: int, write: Callable[[Path], object]) -> Path:
    """Put the checkpoint of `step` in place, atomically: `write` writes its state file (a new one, or one that
    came over HTTP: app.routers.run_files); the oldest beyond KEEP are dropped."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREFIX}{step:09d}"
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".saving-"))
    write(staging / STATE_FILE)
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)
    for old in sorted(folder.glob(f"{PREFIX}*"))[:-CHECKPOINT_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def relative(path: Path, run_dir: Path) -> str:
    """A checkpoint's state file as a path inside its run's folder (how a job names it to the server)."""
    return (path / STATE_FILE).relative_to(run_dir).as_posix()


def load(path: Path) -> dict[str, Any]:
    import torch

    # Tensors, numbers and dicts only, no pickled objects: a checkpoint may have come over HTTP (a job on another
    # node sends its own, app.routers.run_files), and unpickling one would run whatever code it names.
    state: dict[str, Any] = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return state
