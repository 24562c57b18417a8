"""A run's adapter merged into its base model, to take away: started in the background (trainer.merge), followed,
and downloaded as a zip of safetensors, config and tokenizer that `AutoModelForCausalLM.from_pretrained` loads
without peft."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from app.deps import RunId, SessionDep, SettingsDep
from app.routers.runs import get_run
from app.runner.merges import merge_state
from app.security import TokenDep
from app.services import Conflict, request_merge
from store.merges import MODEL_DIR, merged_dir

router = APIRouter(prefix="/api/runs", tags=["merge"], dependencies=[TokenDep])

CHUNK = 1 << 20
"""Bytes read from a model file per piece of the download: the archive is streamed, never held in memory."""


class MergePublic(BaseModel):
    run_id: int
    status: Literal["none", "queued", "running", "completed", "failed"] = Field(
        description="`none`: never asked for (or made from an adapter the run has since replaced)"
    )
    stage: Literal["loading", "merging", "saving"] | None = Field(None, description="What a running job is doing")
    progress: float = Field(0.0, description="0 to 1, by stage")
    error: str | None = None
    model: str | None = Field(None, description="The base model the adapter was merged into")
    dtype: str | None = None
    files: list[str] = Field(default_factory=list, description="What the archive holds, under `model/`")
    size: int | None = Field(None, description="Bytes of the merged model's files")
    seconds: float | None = Field(None, description="How long the merge took")
    download: str | None = Field(None, description="The archive's address, once completed")


def _public(run_id: int, state: dict[str, Any] | None) -> MergePublic:
    if state is None:
        return MergePublic(run_id=run_id, status="none")
    fields = {k: state[k] for k in MergePublic.model_fields if k in state and k not in ("run_id", "download")}
    done = state.get("status") == "completed"
    return MergePublic(run_id=run_id, download=f"/api/runs/{run_id}/merged.zip" if done else None, **fields)


@router.post("/{run_id}/merge", response_model=MergePublic, status_code=status.HTTP_202_ACCEPTED)
def start(run_id: RunId, session: SessionDep, settings: SettingsDep, response: Response) -> MergePublic:
    """Merge the run's adapter into its base model in the background (202), or return the merge already made or
    being made from the same adapter (200); a failed one starts again. Poll `GET /api/runs/{id}/merge`.
    409 while the run is not finished or has no saved adapter."""
    state, started = request_merge(session, settings, run_id)
    if not started:
        response.status_code = status.HTTP_200_OK
    return _public(run_id, state)


@router.get("/{run_id}/merge", response_model=MergePublic)
def read(run_id: RunId, session: SessionDep, settings: SettingsDep) -> MergePublic:
    """The run's merge: its stage and progress while it is made, its files and size once done, or its error."""
    get_run(session, run_id)
    return _public(run_id, merge_state(settings.runs_dir / str(run_id)))


class _Pipe:
    """A write-only stream whose bytes are taken out as they come: zipfile writes the archive into it (with
    data descriptors, as it cannot seek back) while the response sends it."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.pieces.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.pieces = b"".join(self.pieces), []
        return out


def stream_zip(files: list[Path], prefix: str) -> Iterator[bytes]:
    """A stored (not deflated: float weights hardly compress) zip of `files` under `prefix/`, piece by piece."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in files:
            entry = zipfile.ZipInfo.from_file(path, f"{prefix}/{path.name}")  # its size lets zipfile choose ZIP64
            with path.open("rb") as source, archive.open(entry, "w") as target:
                while chunk := source.read(CHUNK):
                    target.write(chunk)
                    yield pipe.take()
    yield pipe.take()  # the central directory, written on close


ZIP_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"application/zip": {}}}}


@router.get("/{run_id}/merged.zip", response_class=StreamingResponse, responses=ZIP_RESPONSE)
def download(run_id: RunId, session: SessionDep, settings: SettingsDep) -> StreamingResponse:
    """The merged model (`model/`: `config.json`, `model.safetensors`, the tokenizer's files) as a zip, streamed;
    409 until `GET /api/runs/{id}/merge` says completed."""
    get_run(session, run_id)
    run_dir = settings.runs_dir / str(run_id)
    state = merge_state(run_dir)
    if state is None or state.get("status") != "completed":
        now = "not asked for" if state is None else state.get("status")
        raise Conflict(f"run {run_id} has no merged model ({now}): POST /api/runs/{run_id}/merge makes it")
    files = sorted(p for p in (merged_dir(run_dir) / MODEL_DIR).iterdir() if p.is_file())
    name = f"stepscope-run-{run_id}-merged.zip"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(stream_zip(files, "model"), media_type="application/zip", headers=headers)
