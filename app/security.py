"""Who may talk to the server: the Host allow-list, the cross-site refusal, the API token and the sign-in cookie.

- Every request must name this server in its `Host` header: a loopback name, STEPSCOPE_HOST, or one of
  STEPSCOPE_ALLOWED_HOSTS. A page on another site that rebinds its DNS name to 127.0.0.1 still sends
  its own name, so it gets 400 (DNS rebinding fails).
- Every request that changes state (POST, PUT, PATCH, DELETE) is refused (403) when a browser says it
  comes from another site or origin (`Sec-Fetch-Site`, `Origin`). Scripts and curl send neither, so
  they are not affected. Another web page can make a browser send "simple" requests (a form post, a
  `fetch` with mode 'no-cors') without reading the answer; this is what stops those.
- With `STEPSCOPE_TOKEN` set, every /api request that changes state must carry
  `Authorization: Bearer <token>`; when the server listens on a non-loopback address, reads need it
  too (`Settings` refuses a public address without a token). The dashboard's pages need a sign-in
  (the cookie below), and their forms carry a CSRF token as well (`app.pages.render`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Header, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.deps import SettingsDep

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# `same-site` is refused too: for a loopback address the "site" is the address without its port, so any
# other local server (a dev server on :5173, another tool's web UI) is same-site, and so are sibling
# subdomains. The dashboard's own pages are always same-origin.
REFUSED_FETCH_SITES = frozenset({"cross-site", "same-site"})


# --- Host allow-list and cross-site refusal (one ASGI middleware) -----------------------------------------


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port, lower-case: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def host_allowed(name: str, settings: Settings) -> bool:
    """Whether a request addressed to `name` (from `host_name`) is for this server."""
    if not name:
        return False
    if "*" in settings.allowed_hosts or name == "localhost" or name in settings.allowed_hosts:
        return True
    if name == settings.host.lower().strip("[]"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback  # 127.0.0.1, any 127.x, ::1
    except ValueError:
        return False


def _origin(scheme: str, netloc: str) -> tuple[str, str, int | None] | None:
    """(scheme, host name, port) with the scheme's default port filled in; None if it is not an origin."""
    if not scheme or not netloc:
        return None
    try:
        port = urlsplit(f"{scheme}://{netloc}").port
    except ValueError:
        return None
    return scheme.lower(), host_name(netloc), port or DEFAULT_PORTS.get(scheme.lower())


def cross_site_reason(headers: Headers, scheme: str) -> str | None:
    """Why a state-changing request must be refused as coming from another site, or None."""
    fetch_site = headers.get("sec-fetch-site", "").lower()
    if fetch_site in REFUSED_FETCH_SITES:
        return f"refused: a request from another site ({fetch_site}, says Sec-Fetch-Site) may not change anything"
    origin = headers.get("origin")
    if origin is None:
        return None  # not a browser (scripts, curl), or a browser's same-origin request that leaves it out
    sent = urlsplit(origin)
    own = _origin(scheme, headers.get("host", ""))  # as the request reached us: scheme://Host
    if _origin(sent.scheme, sent.netloc) != own:  # 'null' (a sandboxed or opaque origin) never matches
        return f"refused: a request from another origin ({origin}) may not change anything"
    return None


class RequestGuard:
    """Pure ASGI middleware: 400 unless `Host` names this server; 403 for a cross-site state change."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan
            return
        headers = Headers(scope=scope)
        name = host_name(headers.get("host", ""))
        if not host_allowed(name, self.settings):
            detail = (
                f"this server does not answer to the host name {name!r} "
                "(add it to STEPSCOPE_ALLOWED_HOSTS if it is one of this server's names)"
            )
            await JSONResponse({"detail": detail}, status.HTTP_400_BAD_REQUEST)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            reason = cross_site_reason(headers, scope["scheme"])
            if reason:
                await JSONResponse({"detail": reason}, status.HTTP_403_FORBIDDEN)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the API token -----------------------------------------------------------------------------------------

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


# --- the sign-in cookie ------------------------------------------------------------------------------------

AUTH_COOKIE = "stepscope_auth"
SECONDS_PER_DAY = 86_400


def _cookie_signature(token: str, expires: int) -> str:
    return hmac.new(token.encode(), f"stepscope dashboard sign-in until {expires}".encode(), hashlib.sha256).hexdigest()


def auth_cookie_value(token: str, days: float = 30, now: float | None = None) -> str:
    """What the sign-in cookie holds: 'EXPIRY.HMAC(token, EXPIRY)', derived from the token, never the token.

    The expiry (a Unix time) is signed, so the server refuses an old cookie even if a browser kept it.
    """
    expires = int((time.time() if now is None else now) + days * SECONDS_PER_DAY)
    return f"{expires}.{_cookie_signature(token, expires)}"


def auth_cookie_valid(value: str, token: str, now: float | None = None) -> bool:
    expires, _, signature = value.partition(".")
    if not re.fullmatch(r"[0-9]{1,12}", expires):
        return False
    signed = secrets.compare_digest(signature.encode(), _cookie_signature(token, int(expires)).encode())
    return signed and int(expires) > (time.time() if now is None else now)


def set_auth_cookie(response: Response, request: Request, settings: Settings) -> None:
    """Sign the browser in for STEPSCOPE_SESSION_DAYS; `Secure` when the request came over HTTPS."""
    seconds = int(settings.session_days * SECONDS_PER_DAY)
    response.set_cookie(
        AUTH_COOKIE,
        auth_cookie_value(settings.token, settings.session_days),
        max_age=seconds,
        expires=seconds,  # Max-Age for browsers, Expires for older clients
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )


def signed_in(request: Request, settings: Settings) -> bool:
    """True without a token; with one, the browser must have signed in at /login (it then holds the cookie)."""
    if not settings.token:
        return True
    return auth_cookie_valid(request.cookies.get(AUTH_COOKIE, ""), settings.token)


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

TRACKIO_TOKEN_HEADER = "X-Trackio-Write-Token"
"""Where Trackio's client sends its write token (`TRACKIO_WRITE_TOKEN`, trackio/remote_client.py)."""


def require_trackio_token(
    request: Request,
    settings: SettingsDep,
    write_token: Annotated[str | None, Header(alias=TRACKIO_TOKEN_HEADER)] = None,
) -> None:
    """`require_token` for the Trackio-compatible endpoints: Trackio's client cannot send a bearer header,
    so its write token stands for STEPSCOPE_TOKEN."""
    if not token_required(request.method, token=settings.token, is_public=settings.is_public):
        return
    if write_token is None or not token_matches(write_token, settings.token):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "Trackio's client needs TRACKIO_WRITE_TOKEN set to STEPSCOPE_TOKEN"
        )


TrackioTokenDep = Depends(require_trackio_token)
