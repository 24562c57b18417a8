"""/api/generate: answers to one prompt from base models and from runs' trained adapters, side by side.

`POST /api/generate` answers with JSON once every answer is complete; `POST /api/generate/stream` sends
newline-delimited JSON events as tokens are chosen (what the playground page reads). Both are plain `def`
routes and the stream is a plain iterator: Starlette runs them in its thread pool, never on the event loop.
The models are kept by `app.playground.Playground` (one per app, within GENERATE_MEMORY_MB).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Session

from app.config import Settings
from app.deps import MAX_ID, SessionDep, SettingsDep
from app.playground import Playground, Source
from app.routers.runs import get_run
from app.security import TokenDep
from app.services import Conflict, check_api_model
from trainer.config import DEFAULT_MODEL

router = APIRouter(prefix="/api/generate", tags=["generate"], dependencies=[TokenDep])

MAX_RUNS = 4  # columns side by side on the playground, besides the base model
MAX_PROMPT_CHARS = 20_000
MAX_NEW_TOKENS = 1024


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    run_ids: list[int] = Field(
        default_factory=list, max_length=MAX_RUNS, description="Runs whose adapters answer (at most 4)"
    )
    base: bool = Field(True, description="Also answer with the base model (each run's, or `model`) without an adapter")
    model: str | None = Field(
        None, description="The base model to answer with when no runs are named (their own base models answer)"
    )
    chat: bool = Field(False, description="Wrap the prompt as a user turn with the tokenizer's chat template")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS, description="Longest answer, in tokens")
    temperature: float = Field(0.0, ge=0, le=2, allow_inf_nan=False, description="0: greedy (the most likely token)")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="Nucleus sampling's probability mass")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the sampling (with temperature > 0)")

    @field_validator("run_ids")
    @classmethod
    def _ids(cls, value: list[int]) -> list[int]:
        if any(not 1 <= i <= MAX_ID for i in value):
            raise ValueError(f"run ids are between 1 and {MAX_ID}")
        if len(set(value)) != len(value):
            raise ValueError("each run at most once")
        return value


class AnswerSource(BaseModel):
    key: str = Field(description="'base:MODEL' or 'run:ID'")
    model: str
    run_id: int | None
    name: str | None = Field(description="The run's name (null for a base model)")
    learning_rate: float | None


class GeneratedAnswer(AnswerSource):
    text: str


class GenerateOut(BaseModel):
    answers: list[GeneratedAnswer] = Field(description="Base models first, then the runs in the order asked")


def get_playground(request: Request) -> Playground:
    playground: Playground = request.app.state.playground
    return playground


PlaygroundDep = Annotated[Playground, Depends(get_playground)]


def _unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"loc": ["body", field], "msg": message, "type": "value_error"}]
    )


Column = tuple[Source, AnswerSource]  # what answers, and how the answer is labelled


def resolve_sources(body: GenerateIn, session: Session, settings: Settings) -> list[Column]:
    """The answers asked for, base models first, checked: 404 for an unknown run, 409 for one without a saved
    adapter, 422 naming the field for a request that asks for nothing or names a model it may not use."""
    if body.run_ids and body.model is not None:
        raise _unprocessable("model", "name either runs (their base models answer) or a model, not both")
    if not body.run_ids and not body.base:
        raise _unprocessable("run_ids", "name at least one run, or ask for the base model")
    runs: list[Column] = []
    for run_id in body.run_ids:
        run = get_run(session, run_id)
        adapter = settings.runs_dir / str(run_id) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise Conflict(f"run {run_id} has no saved adapter ({run.status.value})")
        source = Source(run.model, run_id, adapter)
        runs.append((source, AnswerSource(key=source.key, model=run.model, run_id=run_id, name=run.name,
                                          learning_rate=run.learning_rate)))  # fmt: skip
    models = list(dict.fromkeys(source.model for source, _ in runs))
    if not runs:
        if body.model is None:
            raise _unprocessable("model", f"name the base model to answer with (e.g. {DEFAULT_MODEL}), or runs")
        check_api_model(body.model, settings.models_dir)  # a ModelError: 422 naming `model`
        models = [body.model]
    bases: list[Column] = [
        (Source(m), AnswerSource(key=Source(m).key, model=m, run_id=None, name=None, learning_rate=None))
        for m in (models if body.base else [])
    ]
    return bases + runs


def events(playground: Playground, body: GenerateIn, columns: list[Column]) -> Iterator[dict[str, Any]]:
    """`start` (the columns), then `token` pieces of every answer in turn (one piece each, round robin, so
    the columns fill together), an `end` per answer and `done`; an `error` if generating failed."""
    sources = [source for source, _ in columns]
    yield {"event": "start", "sources": [described.model_dump() for _, described in columns]}
    try:
        playground.open(sources)
    except Exception as exc:  # a model that cannot be loaded: the stream has begun, so say it in the stream
        yield {"event": "error", "detail": f"{type(exc).__name__}: {exc}"}
        return
    try:
        settings = (body.prompt, body.chat, body.max_new_tokens, body.temperature, body.top_p, body.seed)
        streams = {s.key: playground.stream(s, *settings) for s in sources}
        while streams:
            for key, stream in list(streams.items()):
                piece = next(stream, None)
                if piece is None:
                    del streams[key]
                    yield {"event": "end", "key": key}
                else:
                    yield {"event": "token", "key": key, "text": piece}
        yield {"event": "done"}
    except Exception as exc:
        yield {"event": "error", "detail": f"{type(exc).__name__}: {exc}"}
    finally:
        playground.close(sources)


def ndjson(lines: Iterator[dict[str, Any]]) -> StreamingResponse:
    # X-Accel-Buffering: a proxy in front (nginx) must pass each line on as it comes.
    return StreamingResponse(
        (json.dumps(line) + "\n" for line in lines),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post("", response_model=GenerateOut)
def generate(body: GenerateIn, session: SessionDep, settings: SettingsDep, playground: PlaygroundDep) -> GenerateOut:
    """Each base model's and each run's complete answer to the prompt (the run's adapter on its base model)."""
    columns = resolve_sources(body, session, settings)
    texts: dict[str, list[str]] = {source.key: [] for source, _ in columns}
    for event in events(playground, body, columns):
        if event["event"] == "token":
            texts[event["key"]].append(event["text"])
        elif event["event"] == "error":
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, event["detail"])
    return GenerateOut(answers=[GeneratedAnswer(**d.model_dump(), text="".join(texts[d.key])) for _, d in columns])


@router.post("/stream", response_class=StreamingResponse, responses={200: {"content": {"application/x-ndjson": {}}}})
def generate_stream(
    body: GenerateIn, session: SessionDep, settings: SettingsDep, playground: PlaygroundDep
) -> StreamingResponse:
    """The same answers as newline-delimited JSON events, as the tokens are chosen: `{"event": "start",
    "sources": [...]}`, `{"event": "token", "key": "run:3", "text": "..."}`, `{"event": "end", "key": ...}`,
    `{"event": "done"}` (or `{"event": "error", "detail": ...}`). Bad requests fail before the stream: 404/409/422."""
    return ndjson(events(playground, body, resolve_sources(body, session, settings)))
