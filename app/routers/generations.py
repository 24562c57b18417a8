"""What runs answered: a run's answers to its fixed held-out prompts at each eval step (and the ingest of them
by a job recording over HTTP), and its trained adapter as a zip archive to take away."""

from __future__ import annotations

import io
import math
import zipfile
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from app.deps import MAX_ID, DbDep, RunId, SessionDep, SettingsDep
from app.routers.ingest import MAX_ROWS, _claim, _commit, _unprocessable
from app.routers.runs import get_run
from app.security import TokenDep
from app.services import Conflict
from store.generations import read_generations, write_generations
from store.scalars import KEY_PATTERN, write_scalars

router = APIRouter(prefix="/api/runs", tags=["generations"], dependencies=[TokenDep])

MAX_ANSWERS = 64  # trainer.config's bound on generate_count
MAX_TEXT = 100_000  # characters of a prompt or an answer (256 new tokens of any tokenizer fit many times)


class Prompt(BaseModel):
    index: int
    prompt: str
    expected: str | None = Field(description="The held-out completion (null where the dataset has none)")


class AnswerOut(BaseModel):
    index: int = Field(description="The prompt's index in `prompts`")
    output: str
    exact: bool | None = Field(description="Whether the answer is exactly the expected one (trimmed)")
    overlap: float | None = Field(description="Word-overlap F1 against the expected answer")


class StepAnswers(BaseModel):
    step: int
    answers: list[AnswerOut]


class Generations(BaseModel):
    run_id: int
    prompts: list[Prompt]
    steps: list[StepAnswers] = Field(description="Eval steps, oldest first, each with its answer to every prompt")


@router.get("/{run_id}/generations", response_model=Generations)
def run_generations(run_id: RunId, session: SessionDep, db: DbDep) -> dict[str, Any]:
    """The run's answers (greedy, at each eval step) to its held-out prompts; accuracy is among its metrics
    (`eval/exact_match`, `eval/token_overlap`)."""
    get_run(session, run_id)
    return {"run_id": run_id, **read_generations(db, run_id)}


class AnswerIn(BaseModel):
    prompt_index: int = Field(ge=0, lt=MAX_ANSWERS)
    prompt: str = Field(max_length=MAX_TEXT)
    expected: str | None = Field(None, max_length=MAX_TEXT)
    output: str = Field(max_length=MAX_TEXT)
    exact: bool | None = None
    overlap: float | None = Field(None, ge=0, le=1)


class GenerationStep(BaseModel):
    step: int = Field(ge=0, le=MAX_ID)
    answers: list[AnswerIn] = Field(default_factory=list, max_length=MAX_ANSWERS)
    metrics: dict[str, float | None] = Field(default_factory=dict, max_length=16)


class GenerationsIn(BaseModel):
    rows: list[GenerationStep] = Field(max_length=MAX_ROWS)


class Received(BaseModel):
    run_id: int
    rows: int


@router.post("/{run_id}/generations", response_model=Received)
def add_generations(run_id: RunId, body: GenerationsIn, db: DbDep) -> Received:
    """Record eval steps' answers and their scores, from a run's own job recording over HTTP
    (`trainer.http_recorder`); idempotent on (run, step, prompt)."""
    scalars = []
    for i, row in enumerate(body.rows):
        for key, value in row.metrics.items():
            if not KEY_PATTERN.fullmatch(key) or (value is not None and not math.isfinite(value)):
                raise _unprocessable(["rows", i, "metrics", key], "a metric name and a finite number (or null)")
            scalars.append((key, row.step, value))
    answers = [
        (row.step, a.prompt_index, a.prompt, a.expected, a.output, a.exact, a.overlap)
        for row in body.rows
        for a in row.answers
    ]
    _claim(db, run_id)

    def write() -> None:
        write_generations(db, run_id, answers)
        write_scalars(db, run_id, scalars)

    _commit(db, write)
    return Received(run_id=run_id, rows=len(answers))


@router.get("/{run_id}/adapter.zip", response_class=Response, responses={200: {"content": {"application/zip": {}}}})
def download_adapter(run_id: RunId, session: SessionDep, settings: SettingsDep) -> Response:
    """The run's trained LoRA adapter (peft's `adapter_config.json` and `adapter_model.safetensors`) as a zip:
    `PeftModel.from_pretrained(base, folder)` loads it. 409 while the run has none (not ended, or diverged)."""
    run = get_run(session, run_id)
    folder = settings.runs_dir / str(run_id) / "adapter"
    files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise Conflict(f"run {run_id} has no saved adapter ({run.status.value})")
    archive = io.BytesIO()
    # Stored, not deflated: safetensors of float weights hardly compress, and the archive is built in memory.
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in files:
            zf.write(path, f"adapter/{path.name}")
    name = f"stepscope-run-{run_id}-adapter.zip"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    return Response(archive.getvalue(), media_type="application/zip", headers=headers)
