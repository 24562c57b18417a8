"""The app factory: wires settings, the database, the job runner, the routers and the static files."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from app.config import Settings, get_settings
from app.playground import Playground
from app.routers import (
    datasets,
    generate,
    generations,
    health,
    ingest,
    landscape,
    lr_range,
    merge,
    metrics,
    models,
    run_files,
    runs,
    sweeps,
    trackio,
)
from app.runner.runner import make_runner
from app.security import RequestGuard
from app.services import Conflict, NotFound
from store.db import make_engine, upgrade
from trainer.catalog import ModelError
from trainer.config import ConfigError
from trainer.data import DataError

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MULTIPART_ALLOWANCE = 64 * 1024  # a request body may exceed the upload limit by the multipart framing

DESCRIPTION = """
Start LoRA fine-tuning runs and learning-rate sweeps, follow them live, and read every optimizer
step's metrics (JSON, downsampled JSON that keeps spikes, CSV, or Server-Sent Events).

With `STEPSCOPE_TOKEN` set, calls that change state need `Authorization: Bearer <token>` (and, on a
public address, every call does). Calls that change state are refused (403) when a browser says they
come from another site (`Origin`, `Sec-Fetch-Site`); scripts send neither. A request whose `Host` is not
one of this server's names gets 400.
"""


def _unprocessable(loc: list[str | int], message: str, **extra: object) -> JSONResponse:
    detail = {"loc": loc, "msg": message, "type": "value_error", **extra}
    return JSONResponse({"detail": [detail]}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _bad_input(request: Request, exc: Exception) -> JSONResponse:
    """Invalid input found past request validation (an unknown model or dataset, a bad file): 422."""
    if isinstance(exc, ConfigError):
        return _unprocessable(["body", *exc.field.split(".")], exc.reason)
    for error, field in ((ModelError, "model"), (DataError, "dataset")):
        if isinstance(exc, error):
            return _unprocessable(["body", field], str(exc), **{k: getattr(exc, k, None) for k in ("line", "field")})
    raise exc  # any other ValueError is a bug: a 500


def _json_safe(value: Any) -> Any:
    """JSON has no inf or NaN: echo such an input as text ('inf') instead of failing to answer."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, but safe for an input such as `"learning_rate": Infinity` that it echoes back."""
    assert isinstance(exc, RequestValidationError)
    detail = _json_safe(jsonable_encoder(exc.errors()))
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)


def _plotly_js() -> Path:
    spec = importlib.util.find_spec("plotly")  # found, not imported: importing plotly takes a while
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the plotly package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"


def create_app(settings: Settings | None = None, *, run_jobs: bool = True) -> FastAPI:
    """The stepscope app. `run_jobs=False` leaves queued runs queued (tests that must not train)."""
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)
    runner = make_runner(settings, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(upgrade, settings.database_url)
        if run_jobs:
            await run_in_threadpool(runner.start)
        try:
            yield
        finally:
            await run_in_threadpool(runner.stop)
            engine.dispose()

    app = FastAPI(
        title="stepscope",
        summary="LoRA fine-tuning runs, every optimizer step recorded",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
        max_body_size=settings.max_upload_bytes + MULTIPART_ALLOWANCE,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.runner = runner
    app.state.playground = Playground(
        int(settings.generate_memory_mb * 2**20), settings.model_cache_dir, settings.generate_threads
    )
    for module in (runs, ingest, generations, generate, sweeps, lr_range, metrics, landscape, datasets, models, health,
                   trackio, merge, run_files):  # fmt: skip
        app.include_router(module.router)
    if importlib.util.find_spec("app.pages") is not None:
        from app import pages

        app.include_router(pages.router)
    plotly_js = _plotly_js()

    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    def plotly() -> FileResponse:
        return FileResponse(plotly_js, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(ValueError, _bad_input)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(Conflict, _conflict)
    app.add_middleware(RequestGuard, settings=settings)  # Host allow-list and cross-site refusal, before routing
    return app
