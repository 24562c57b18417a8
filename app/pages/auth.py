"""Sign-in (only with STEPSCOPE_TOKEN set): the form and the cookie it sets."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.deps import SettingsDep
from app.pages.render import CheckedForm, render
from app.security import set_auth_cookie

router = APIRouter()


def _local_path(target: str) -> str:
    """Only a path on this site may be a redirect target (never //other.site or http://...)."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next_: Annotated[str, Query(alias="next")] = "/") -> HTMLResponse:
    return render(request, "login.html", {"next": _local_path(next_), "error": ""})


@router.post("/login", response_model=None)
def login(request: Request, settings: SettingsDep, form: CheckedForm) -> Response:
    target = _local_path(str(form.get("next", "/")))
    sent = form.get("token", "")
    if (
        not settings.token
        or not isinstance(sent, str)
        or not secrets.compare_digest(sent.encode(), settings.token.encode())
    ):
        return render(request, "login.html", {"next": target, "error": "That is not the server's token."}, 401)
    response = RedirectResponse(target, 303)
    set_auth_cookie(response, request, settings)
    return response
