"""The playground: one prompt, answered side by side by a base model and by up to four runs' adapters,
streamed as the tokens are chosen (static/playground.js reads `POST /playground/generate`, the same
stream as `POST /api/generate/stream`, behind the dashboard's sign-in and CSRF token instead of the API token)."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from sqlmodel import col, select

from app.deps import SessionDep, SettingsDep
from app.pages.compare import parse_ids
from app.pages.render import CSRF_COOKIE, render, require_sign_in
from app.routers.generate import MAX_NEW_TOKENS, MAX_RUNS, GenerateIn, PlaygroundDep, events, ndjson, resolve_sources
from store.tables import FINISHED, Run
from trainer.catalog import BUILTIN_MODELS

router = APIRouter(dependencies=[Depends(require_sign_in)])

MAX_LISTED = 200  # runs offered to pick from, newest first


@router.get("/playground", response_class=HTMLResponse)
def playground_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    ids: Annotated[list[str] | None, Query()] = None,
) -> HTMLResponse:
    finished = session.exec(
        select(Run).where(col(Run.status).in_(FINISHED)).order_by(col(Run.id).desc()).limit(MAX_LISTED)
    ).all()
    runs = [r for r in finished if (settings.runs_dir / str(r.id) / "adapter" / "adapter_config.json").is_file()]
    available = {r.id for r in runs}
    chosen = [i for i in parse_ids(ids or []) if i in available][:MAX_RUNS]
    rows: list[dict[str, Any]] = [
        {"id": r.id, "name": r.name, "lr": r.learning_rate, "model": r.model, "dataset": r.dataset} for r in runs
    ]
    context = {
        "runs": runs,
        "chosen": chosen,
        "models": list(BUILTIN_MODELS),
        "max_runs": MAX_RUNS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "rows": rows,
    }
    return render(request, "playground.html", context)


@router.post("/playground/generate", response_class=StreamingResponse)
def playground_generate(
    request: Request,
    body: GenerateIn,
    session: SessionDep,
    settings: SettingsDep,
    playground: PlaygroundDep,
    x_csrf_token: Annotated[str, Header()] = "",
) -> StreamingResponse:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie, x_csrf_token):
        raise HTTPException(403, "The page's security token is missing or stale: reload the page.")
    return ndjson(events(playground, body, resolve_sources(body, session, settings)))
