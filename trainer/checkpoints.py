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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_SECONDS = 600.0  # 10 minutes: a slow run's checkpoints are never further apart
CHECKPOINT_KEEP = 2
PREFIX = "step-"


@dataclass
class Resumed:
    """Where a resumed run goes on from."""

    step: int
    samples: int
    tokens: int
    wall_time: float


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The newest whole checkpoint of a run, or None."""
    folder = checkpoint_dir(run_dir)
    found = sorted(folder.glob(f"{PREFIX}*/state.pt")) if folder.is_dir() else []
    return found[-1].parent if found else None


def save(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write `state` (with its `step`) as the run's newest checkpoint, atomically; drop the oldest beyond KEEP."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{PREFIX}{state['step']:09d}"
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".saving-"))
    torch.save(state, staging / "state.pt")
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)
    for old in sorted(folder.glob(f"{PREFIX}*"))[:-CHECKPOINT_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load(path: Path) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return state
