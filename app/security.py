"""The API token check.

With `STEPSCOPE_TOKEN` set, every /api request that changes state must carry
`Authorization: Bearer <token>`; when the server listens on a non-loopback address, reads need it
too. (`Settings.check_safe_to_serve` refuses a public address without a token; the HTML forms
have their own CSRF protection in `app.pages`.)
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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


def require_token(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Router dependency of every /api router: 401 unless the request may go through."""
    if not token_required(request.method, token=settings.token, is_public=settings.is_public):
        return
    if credentials is None or not token_matches(credentials.credentials, settings.token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "this call needs the header 'Authorization: Bearer <STEPSCOPE_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


TokenDep = Depends(require_token)
