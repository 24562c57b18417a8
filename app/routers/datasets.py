"""/api/datasets: the built-in datasets and the user's uploaded JSONL/CSV files."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path as FilePath
from typing import Annotated, BinaryIO

from fastapi import APIRouter, File, Form, HTTPException, Path, Response, UploadFile, status
from pydantic import BaseModel
from sqlmodel import Session, col, select

from app.config import Settings
from app.deps import MAX_ID, SessionDep, SettingsDep
from app.security import TokenDep
from app.services import Conflict, NotFound
from store.tables import FINISHED, Dataset, DatasetPublic, Run
from trainer.data import BUILTIN_DATASETS, DataError, inspect_file

router = APIRouter(prefix="/api/datasets", tags=["datasets"], dependencies=[TokenDep])

UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv")
CHUNK_BYTES = 1 << 20


class UploadTooLarge(ValueError):
    """An upload over `Settings.max_upload_bytes` (the API answers 413)."""


class BuiltinDatasetPublic(BaseModel):
    name: str
    description: str
    n_train: int
    n_eval: int


class UploadedDatasetPublic(DatasetPublic):
    filename: str
    """The value to put in a config's `dataset` field."""


class DatasetsPublic(BaseModel):
    builtin: list[BuiltinDatasetPublic]
    uploaded: list[UploadedDatasetPublic]


def save_dataset(session: Session, settings: Settings, filename: str, source: BinaryIO, name: str = "") -> Dataset:
    """Store an uploaded file under HOME/datasets with a generated name, validate it, record it.

    Raises UploadTooLarge, or trainer.data.DataError naming the line and field (the file is deleted).
    """
    original = FilePath(filename.replace("\\", "/")).name  # the client's name is a label, never a path
    suffix = FilePath(original).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise DataError(f"must be a {', '.join(UPLOAD_SUFFIXES)} file", file=original or "upload")
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    stored = f"{uuid.uuid4().hex}{suffix}"
    target = settings.datasets_dir / stored
    try:
        size = 0
        with target.open("xb") as out:
            while chunk := source.read(CHUNK_BYTES):
                size += len(chunk)
                if size > settings.max_upload_bytes:
                    raise UploadTooLarge(f"the file is larger than the limit of {settings.max_upload_bytes} bytes")
                out.write(chunk)
        try:
            fmt, n_rows = inspect_file(target)
        except DataError as exc:  # name the user's file, not the generated one
            renamed = DataError(str(exc).replace(stored, original))
            renamed.file, renamed.line, renamed.field = original, exc.line, exc.field
            raise renamed from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    dataset = Dataset(
        name=(name.strip() or original)[:200], format=fmt, n_rows=n_rows, size_bytes=size, filename=stored
    )
    session.add(dataset)
    session.commit()
    session.refresh(dataset)
    return dataset


def delete_dataset(session: Session, settings: Settings, dataset_id: int) -> None:
    """Delete an uploaded dataset that no queued or running run still needs."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFound(f"no dataset with id {dataset_id}")
    users = select(Run.id).where(Run.dataset == dataset.filename, col(Run.status).not_in(FINISHED))
    if session.exec(users).first() is not None:
        raise Conflict(f"dataset {dataset_id} is used by a queued or running run")
    session.delete(dataset)
    session.commit()
    with contextlib.suppress(OSError):
        (settings.datasets_dir / FilePath(dataset.filename).name).unlink()


@router.get("", response_model=DatasetsPublic)
def list_datasets(session: SessionDep) -> DatasetsPublic:
    builtin = [
        BuiltinDatasetPublic(name=d.name, description=d.description, n_train=d.n_train, n_eval=d.n_eval)
        for d in BUILTIN_DATASETS.values()
    ]
    uploads = session.exec(select(Dataset).order_by(col(Dataset.id).desc()))
    return DatasetsPublic(builtin=builtin, uploaded=[UploadedDatasetPublic.model_validate(d) for d in uploads])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UploadedDatasetPublic)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="JSONL or CSV: prompt/completion, text, or chat messages")],
    name: Annotated[str, Form(max_length=200, description="Display name (default: the file's name)")] = "",
) -> Dataset:
    """Upload a dataset; every record is checked now (422 naming the line and field), size-limited (413)."""
    try:
        return save_dataset(session, settings, file.filename or "", file.file, name)
    except UploadTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except DataError as exc:
        detail = {"loc": ["body", "file"], "msg": str(exc), "type": "value_error", "line": exc.line, "field": exc.field}
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, [detail]) from None


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete(dataset_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, settings: SettingsDep) -> Response:
    """Delete an uploaded dataset (409 while a queued or running run uses it)."""
    delete_dataset(session, settings, dataset_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
