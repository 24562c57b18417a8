"""GPU choice: which GPUs there are, and the least busy one for a job that may use any."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def detect_gpus() -> list[str]:
    """GPU ids to hand out through CUDA_VISIBLE_DEVICES ([] on a machine without CUDA GPUs)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the CUDA runtime's variable, not a stepscope setting
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if not Path("/proc/driver/nvidia").exists() and not shutil.which("nvidia-smi"):
        return []  # no NVIDIA driver: not worth importing torch (seconds) to hear that
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def least_busy(gpus: list[str], device: str, busy: Iterable[str | None]) -> str | None:
    """The GPU with the fewest jobs for a job whose device is auto or cuda (None: leave the environment alone)."""
    if not gpus or device not in ("auto", "cuda"):
        return None
    taken = list(busy)
    return min(gpus, key=taken.count)
