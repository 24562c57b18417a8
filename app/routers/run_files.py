"""A run's files over HTTP: what a job on a node without the server's data directory (a Ray worker on another
machine, no shared filesystem) sends back, and fetches again when its run is resumed somewhere else.

Only the files the server reads have a place here: the trained adapter (for its download, the playground and
merging), the newest checkpoints (for a resume on any node) and the map's snapshots. A job that shares the
server's data directory (one machine, or a shared filesystem; `store.settings.shares_home`) writes them in
place and sends nothing.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel

from app.deps import RunId, SessionDep, SettingsDep
from app.routers.runs import get_run
from app.security import TokenDep
from app.services import Conflict, NotFound
from store.landscape import SNAPSHOTS_FILE
from store.tables import RunStatus
from trainer import checkpoints

router = APIRouter(prefix="/api/runs", tags=["run files"], dependencies=[TokenDep])

CHECKPOINT = re.compile(rf"{checkpoints.CHECKPOINT_FOLDER}/{checkpoints.PREFIX}(\d{{9}})/{checkpoints.STATE_FILE}")
ADAPTER = re.compile(r"adapter/(adapter_config\.json|adapter_model\.safetensors|README\.md)")
"""What peft's `save_pretrained` writes, and nothing else: no `adapter_model.bin`, which loading would unpickle."""
PLACES = (CHECKPOINT, ADAPTER, re.compile(re.escape(SNAPSHOTS_FILE)))


class RunFile(BaseModel):
    path: str
    bytes: int


class RunFiles(BaseModel):
    files: list[RunFile]


def _is_run_file(path: str) -> bool:
    return any(place.fullmatch(path) for place in PLACES)


def _checked(path: str) -> None:
    if not _is_run_file(path):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": ["path", "path"], "msg": f"not a run file: {_described()}", "type": "value_error"}],
        )


def _described() -> str:
    return (
        f"{checkpoints.CHECKPOINT_FOLDER}/{checkpoints.PREFIX}<9 digits>/{checkpoints.STATE_FILE}, "
        f"adapter/(adapter_config.json|adapter_model.safetensors|README.md) or {SNAPSHOTS_FILE}"
    )


@router.put("/{run_id}/files/{path:path}", response_model=RunFile)
async def put_run_file(
    run_id: RunId, path: str, request: Request, session: SessionDep, settings: SettingsDep
) -> RunFile:
    """Store one file of a running run (the body is its bytes), atomically: a checkpoint is put in place like one
    saved here (the oldest beyond the kept ones dropped). 409 once the run has ended; 413 over
    STEPSCOPE_MAX_UPLOAD_BYTES."""
    _checked(path)
    run = get_run(session, run_id)
    if run.status not in (RunStatus.queued, RunStatus.running):
        raise Conflict(f"run {run_id} already finished ({run.status.value})")
    run_dir = settings.runs_dir / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=run_dir, prefix=".upload-")
    part = Path(name)
    size = 0
    try:
        with os.fdopen(handle, "wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                await run_in_threadpool(out.write, chunk)
        await run_in_threadpool(_place, run_dir, path, part)
    finally:
        part.unlink(missing_ok=True)
    return RunFile(path=path, bytes=size)


def _place(run_dir: Path, path: str, part: Path) -> None:
    if match := CHECKPOINT.fullmatch(path):
        checkpoints.place(run_dir, int(match.group(1)), lambda target: os.replace(part, target))
        return
    target = run_dir / path
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)


@router.get("/{run_id}/files", response_model=RunFiles)
def list_run_files(run_id: RunId, session: SessionDep, settings: SettingsDep) -> RunFiles:
    """The run's files that a job may fetch (its checkpoints, newest last, and the rest), with their sizes."""
    get_run(session, run_id)
    run_dir = settings.runs_dir / str(run_id)
    found = sorted(p for p in run_dir.rglob("*") if p.is_file()) if run_dir.is_dir() else []
    files = [(p.relative_to(run_dir).as_posix(), p) for p in found]
    return RunFiles(files=[RunFile(path=rel, bytes=p.stat().st_size) for rel, p in files if _is_run_file(rel)])


@router.get("/{run_id}/files/{path:path}", response_class=FileResponse)
def get_run_file(run_id: RunId, path: str, session: SessionDep, settings: SettingsDep) -> FileResponse:
    """One of the run's files (404 when it has none by that name)."""
    _checked(path)
    get_run(session, run_id)
    target = settings.runs_dir / str(run_id) / path
    if not target.is_file():
        raise NotFound(f"run {run_id} has no file {path}")
    return FileResponse(target, media_type="application/octet-stream")
