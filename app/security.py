"""The API token check.

With `STEPSCOPE_TOKEN` set, every /api request that changes state must carry
`Authorization: Bearer <token>`; when the server listens on a non-loopback address, reads need it
too. (`Settings.check_safe_to_serve` refuses a public address without a token; the HTML forms
have their own CSRF protection in `app.pages`.)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.deps import SettingsDep

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer = HTTPBearer(
    auto_error=False,
    description="STEPSCOPE_TOKEN: needed for calls that change state, and for every call on a public address",
)


def token_required(method: str, *, token: str, is_public: bool) -> bool:
    if not token:
        return False
    return is_public or method.upper() not in SAFE_METHODS


def token_matches(sent: str, token: str) -> bool:
    return secrets.compare_digest(sent.encode(), token.encode())


AUTH_COOKIE = "stepscope_auth"


def auth_cookie_value(token: str) -> str:
    """What the dashboard's sign-in cookie holds: derived from the token, never the token itself."""
    return hmac.new(token.encode(), b"stepscope dashboard sign-in", hashlib.sha256).hexdigest()


def signed_in(request: Request, settings: Settings) -> bool:
    """True without a token; with one, the browser must have signed in at /login (it then holds the cookie)."""
    if not settings.token:
        return True
    return secrets.compare_digest(
        request.cookies.get(AUTH_COOKIE, "").encode(), auth_cookie_value(settings.token).encode()
    )


def require_token(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Router dependency of every /api router: 401 unless the request may go through."""
    if not token_required(request.method, token=settings.token, is_public=settings.is_public):
        return
    # The dashboard's scripts read the API with the browser's sign-in cookie (an EventSource cannot send
    # headers). Reads only: the cookie is SameSite=strict, and state changes still need the bearer token.
    if request.method in SAFE_METHODS and signed_in(request, settings):
        return
    if credentials is None or not token_matches(credentials.credentials, settings.token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this call needs the header 'Authorization: Bearer <STEPSCOPE_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


TokenDep = Depends(require_token)
