"""Authentication and response hardening for the dashboard's Flask server.

When ``KLMON_DASHBOARD_USER``/``KLMON_DASHBOARD_PASSWORD`` or ``KLMON_DASHBOARD_TOKEN`` is set,
every request except ``/healthz`` needs either HTTP basic auth or the token (an
``Authorization: Bearer`` header, the ``klmon_token`` cookie, or ``?token=`` once: the server
then sets the cookie and redirects to the same URL without the token, so it does not stay
in the address bar or in links). Comparisons are constant-time. The cookie holds a digest
of the token, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qsl, urlencode

from flask import Flask, Response, g, has_request_context, redirect, request

from monitor.dashboard.settings import DashboardSettings

COOKIE = "klmon_token"
OPEN_PATHS = frozenset({"/healthz"})
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Dash boots with one inline script; plotly.js compiles some code at run time.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
        "connect-src 'self'; worker-src 'self' blob:; frame-ancestors 'none'; "
        "object-src 'none'; base-uri 'self'; form-action 'self'"
    ),
}


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _cookie_value(token: str) -> str:
    return hashlib.sha256(("klmon-dashboard-cookie:" + token).encode("utf-8")).hexdigest()


def current_user() -> str:
    """Who is making this request, for acknowledgements and notes ("dashboard" if unknown)."""
    if has_request_context():
        user = getattr(g, "klmon_user", None)
        if user:
            return str(user)
    return "dashboard"


def install(server: Flask, settings: DashboardSettings) -> None:
    """Require authentication when configured; add security headers to every response."""

    @server.after_request
    def _headers(resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    if not settings.auth_configured:
        return

    @server.before_request
    def _guard() -> Any:
        if request.path in OPEN_PATHS:
            return None
        if settings.user is not None and settings.password is not None:
            a = request.authorization
            if (
                a is not None
                and a.type == "basic"
                and _same(a.username or "", settings.user)
                and _same(a.password or "", settings.password)
            ):
                g.klmon_user = a.username
                return None
        if settings.token is not None:
            header = request.headers.get("Authorization", "")
            if header.lower().startswith("bearer ") and _same(header[7:].strip(), settings.token):
                g.klmon_user = "token"
                return None
            cookie = request.cookies.get(COOKIE)
            if cookie and _same(cookie, _cookie_value(settings.token)):
                g.klmon_user = "token"
                return None
            given = request.args.get("token")
            if given is not None and _same(given, settings.token):
                rest = [
                    (k, v)
                    for k, v in parse_qsl(request.query_string.decode("latin-1"))
                    if k != "token"
                ]
                target = request.path + ("?" + urlencode(rest) if rest else "")
                resp = redirect(target, code=303)
                resp.set_cookie(
                    COOKIE,
                    _cookie_value(settings.token),
                    httponly=True,
                    samesite="Strict",
                    secure=request.is_secure,
                    max_age=30 * 86400,
                )
                return resp
        resp = Response("authentication required\n", status=401, mimetype="text/plain")
        if settings.user is not None:
            resp.headers["WWW-Authenticate"] = 'Basic realm="klmon", charset="UTF-8"'
        return resp
