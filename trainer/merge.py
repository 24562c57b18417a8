"""`python -m trainer.merge RUN_ID`: a run's LoRA adapter merged into its base model, made in the background.

The job loads the base model the run trained (from local files only, as the run did), applies the adapter the
run saved, folds it into the weights (`merge_and_unload`: W + (alpha/r)·B·A, so the result is an ordinary
model that needs no peft) and writes it with its tokenizer as safetensors, in fp32 as the run trained it.
It works on the CPU: the server's GPUs belong to training jobs, and a merge is one pass over the weights.

Its stage, progress, result or error go into the run's `merged/state.json` (`store.merges`); the server only
reads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from peft import PeftModel

from store.merges import (
    ADAPTER_DIR,
    MODEL_DIR,
    STAGES,
    adapter_stamp,
    has_adapter,
    merged_dir,
    read_state,
    write_state,
)
from store.processes import process_start_time
from store.settings import DataSettings
from trainer.models import load_base

log = logging.getLogger("trainer.merge")


class MergeError(Exception):
    """A merge that cannot be made for this run; the message says why."""


def _model_spec(db_path: Path, run_id: int) -> str:
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as conn:
        row = conn.execute("SELECT config FROM runs WHERE id = ?", (run_id,)).fetchone()
    if row is None:
        raise MergeError(f"no run with id {run_id}")
    spec = json.loads(row[0]).get("model")
    if not isinstance(spec, str) or not spec:
        raise MergeError(f"run {run_id}'s config names no model")
    return spec


def merge(settings: DataSettings, run_id: int, stage: Any) -> dict[str, Any]:
    """Write the merged model to `merged/model/` (beside it first, renamed when complete, so a half-written
    folder is never served); `stage(name)` reports each stage as it begins."""
    started = time.perf_counter()
    run_dir = settings.runs_dir / str(run_id)
    spec = _model_spec(settings.db_path, run_id)
    stage("loading")
    base, tok = load_base(spec, settings.model_cache_dir)
    model = PeftModel.from_pretrained(base, str(run_dir / ADAPTER_DIR))
    stage("merging")
    merged = model.merge_and_unload()
    stage("saving")
    target = merged_dir(run_dir) / MODEL_DIR
    staging = target.with_name(MODEL_DIR + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a job that died while writing
    merged.save_pretrained(staging)  # safetensors (transformers 5 writes nothing else)
    tok.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    files = sorted(p for p in target.iterdir() if p.is_file())
    return {
        "model": spec,
        "dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
        "files": [p.name for p in files],
        "size": sum(p.stat().st_size for p in files),
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m trainer.merge RUN_ID", file=sys.stderr)
        return 2
    run_id = int(args[0])
    settings = DataSettings()
    run_dir = settings.runs_dir / str(run_id)
    if not has_adapter(run_dir):
        print(f"run {run_id} has no saved adapter in {run_dir}", file=sys.stderr)
        return 2
    merged_dir(run_dir).mkdir(exist_ok=True)  # the server makes it when it queues the merge; by hand, here
    me = os.getpid()
    state = read_state(run_dir) or {}
    state.update(status="running", pid=me, pid_start=process_start_time(me), stage=None, progress=0.0, error=None,
                 adapter=adapter_stamp(run_dir))  # fmt: skip
    write_state(run_dir, state)

    def stage(name: str) -> None:
        log.info("run %d: %s", run_id, name)
        state.update(stage=name, progress=STAGES[name])
        write_state(run_dir, state)

    try:
        result = merge(settings, run_id, stage)
    except Exception as exc:
        error = str(exc) if isinstance(exc, MergeError) else f"{type(exc).__name__}: {exc}"
        write_state(run_dir, state | {"status": "failed", "error": f"The merge failed: {error}"})
        log.exception("merge of run %d failed", run_id)
        return 1
    write_state(run_dir, state | result | {"status": "completed", "stage": None, "progress": 1.0})
    log.info("run %d: merged into %s, %d bytes in %.1f s", run_id, result["model"], result["size"], result["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
