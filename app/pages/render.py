"""What every page shares: value formatting, the Jinja2 templates, the CSRF double-submit cookie and
the sign-in check.

Every form post carries a CSRF token: a random value in a cookie that the form must echo in a hidden
field (double submit). Another site can make a browser post to us, but it cannot read our cookie, so it
cannot forge the field.
"""

from __future__ import annotations

import math
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.datastructures import FormData
from starlette.templating import Jinja2Templates

from app.deps import SettingsDep
from app.security import signed_in
from store.tables import FINISHED, Run

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
CSRF_COOKIE = "stepscope_csrf"
CSRF_FIELD = "csrf_token"


def fmt_lr(value: float | None) -> str:
    """A learning rate the way people write them: 3e-4, 1.5e-3 (the JS fmtLr gives the same text)."""
    if value is None or not math.isfinite(value) or value <= 0:
        return "—" if value is None else str(value)
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def fmt_num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _aware(moment: datetime) -> datetime:
    """SQLite gives datetimes back without a zone; they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def fmt_time(moment: datetime | None) -> str:
    return "—" if moment is None else _aware(moment).strftime("%Y-%m-%d %H:%M UTC")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def run_duration(run: Run) -> float | None:
    if run.started_at is None:
        return None
    end = _aware(run.finished_at) if run.finished_at else datetime.now(UTC)
    return (end - _aware(run.started_at)).total_seconds()


def _make_templates() -> Jinja2Templates:
    env = Environment(loader=FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=StrictUndefined)
    env.filters.update(lr=fmt_lr, num=fmt_num, time=fmt_time, duration=fmt_duration)
    env.globals.update(run_duration=run_duration, FINISHED=FINISHED)
    return Jinja2Templates(env=env)


templates = _make_templates()


# --- CSRF (double-submit cookie) and sign-in ------------------------------------------------------------


def csrf_token(request: Request) -> str:
    """The browser's token (from its cookie), or a new one that `render` will set as the cookie."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if not re.fullmatch(r"[A-Za-z0-9_-]{32,64}", token):
        token = getattr(request.state, "new_csrf", None) or secrets.token_urlsafe(32)
        request.state.new_csrf = token
    return token


def render(request: Request, template: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    context = {"csrf_token": csrf_token(request), **context}
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    new = getattr(request.state, "new_csrf", None)
    if new:
        response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="lax", path="/")
    return response


async def checked_form(request: Request) -> FormData:
    """The posted form, after checking that it came from one of our pages."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise HTTPException(403, "Cross-site form posts are refused.")
    form = await request.form()
    cookie = request.cookies.get(CSRF_COOKIE, "")
    sent = form.get(CSRF_FIELD)
    if not cookie or not isinstance(sent, str) or not secrets.compare_digest(cookie, sent):
        raise HTTPException(403, "The form's security token is missing or stale: reload the page and submit again.")
    return form


CheckedForm = Annotated[FormData, Depends(checked_form)]


def require_sign_in(request: Request, settings: SettingsDep) -> None:
    """With STEPSCOPE_TOKEN set the pages (and their forms, which start and cancel runs) need a sign-in."""
    if not signed_in(request, settings):
        target = "/login?" + urlencode(
            {"next": request.url.path + (f"?{request.url.query}" if request.url.query else "")}
        )
        raise HTTPException(303, "sign in first", headers={"Location": target})


def not_found(request: Request, what: str) -> HTMLResponse:
    return render(request, "error.html", {"title": "Not found", "message": f"{what} does not exist."}, 404)
