"""Error responses: JSON with a detail, and 503 while the database is unreachable."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.datastructures import MutableHeaders
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import TRANSIENT_SQLSTATES, database_unavailable, sqlstate

logger = logging.getLogger("app.api")
RETRY_AFTER_SECONDS = 5
UNAVAILABLE = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)

#: Documented error responses, shared by the routes' OpenAPI entries.
ERRORS: dict[int | str, dict[str, object]] = {
    400: {
        "description": "A request body that cannot be decoded (not UTF-8, or nested too deep"
        " to parse), or a URL holding a NUL; a body that is not valid JSON is a 422"
        " (json_invalid)"
    },
    401: {"description": "Missing, malformed or revoked token"},
    413: {"description": "A request body over MAX_REQUEST_BYTES"},
    503: {"description": "The database is unreachable; retry after Retry-After seconds"},
}


def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    what = "database unavailable"
    if isinstance(exc, PoolTimeoutError):  # the database answers; this process is overloaded
        what = "every pooled database connection busy (overload, not an outage)"
    logger.warning(
        "%s for %s %s: %s",
        what,
        request.method,
        request.url.path,
        str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__,
    )
    return JSONResponse(
        {"detail": "database unavailable, retry later"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _on_dbapi_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, DBAPIError) and (exc.connection_invalidated or database_unavailable(exc)):
        return _unavailable(request, exc)
    if sqlstate(exc) in TRANSIENT_SQLSTATES:  # a deadlock, a serialization failure: retry
        return _unavailable(request, exc)
    if isinstance(exc, UNAVAILABLE):
        return _unavailable(request, exc)
    raise exc


#: the methods a 405's Allow header may name
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(app: FastAPI, scope: Scope) -> list[str] | None:
    """Every method some route serves at the request's path, asked of the routes themselves
    (``BaseRoute.matches``; FastAPI's included routers keep their routes to themselves).
    None when a route serves the request's own method: its endpoint answered 405 and named
    what it allows."""

    def served(method: str) -> bool:
        probe = {**scope, "method": method}
        return any(route.matches(probe)[0] is Match.FULL for route in app.routes)

    if served(scope["method"]):
        return None
    return [method for method in METHODS if served(method)]


#: Methods whose request body the guard checks (size, encoding).
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _preflight(scope: Scope) -> bool:
    """A CORS preflight: for CORS to answer (the CORS middleware, when configured, is
    outside the guard and answers it first; without it, the route's 405 does)."""
    return scope["method"] == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in scope.get("headers", ())
    )


#: Routes whose body is JSON: another Content-Type is a 415, not a 422 that echoes it.
JSON_BODY_PATHS: frozenset[str] = frozenset()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _refuse(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status)


def _unauthorized_up_front(authorization: str | None) -> JSONResponse | None:
    """The 401 the auth dependency gives a request with no bearer token (no Authorization
    header, or another scheme: FastAPI's HTTPBearer reads both as none), or None: a
    bearer token is checked there, against the database, as for every route."""
    scheme = (authorization or "").partition(" ")[0]
    if authorization and scheme.lower() == "bearer":
        return None
    detail = "missing bearer token (Authorization: Bearer <token>)"
    return JSONResponse({"detail": detail}, 401, {"WWW-Authenticate": "Bearer"})


def _not_utf8(start: bytes) -> bool:
    """JSON text in UTF-16 or UTF-32 (which ``json.loads`` of bytes would guess and take):
    a NUL among its first four bytes, or a UTF-16 byte order mark. A UTF-8 BOM is let be."""
    return b"\x00" in start[:4] or start[:2] in (b"\xff\xfe", b"\xfe\xff")


class GuardMiddleware:
    """Refuse URLs with NUL characters (400), answer 405 for a path in ``only`` (path →
    the methods it serves) asked with any other method, and complete 405s' Allow header
    (Starlette lists only the first matching route's methods). Request bodies: over
    ``max_body`` bytes a 413, said by Content-Length before any of it is read or found
    while it streams in; not UTF-8 (UTF-16, UTF-32) a 400; on ``json_paths``, a
    Content-Type other than JSON a 415.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs
    every request through a task group and memory streams, which cost a POST /tasks ~15 %
    of its server time."""

    def __init__(
        self,
        app: ASGIApp,
        routes: FastAPI,
        only: Mapping[str, tuple[str, ...]] | None = None,
        max_body: int | None = None,
        json_paths: frozenset[str] = JSON_BODY_PATHS,
    ) -> None:
        self.app = app
        self.routes = routes
        self.only = dict(only or {})
        self.max_body = max_body
        self.json_paths = json_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            response = JSONResponse({"detail": "NUL characters are not allowed in URLs"}, 400)
            await response(scope, receive, send)
            return
        only = self.only.get(path.rstrip("/") or "/")
        if only is not None and scope["method"] not in only and not _preflight(scope):
            allow = {"Allow": ", ".join(only)}
            await JSONResponse({"detail": "Method Not Allowed"}, 405, allow)(scope, receive, send)
            return

        refused = self._refused_up_front(scope, path)
        if refused is not None:
            await refused(scope, receive, send)
            return

        started: list[bool] = []

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.append(True)
            if message["type"] == "http.response.start" and message["status"] == 405:
                allowed = list(only) if only is not None else allowed_methods(self.routes, scope)
                if allowed is not None:
                    MutableHeaders(scope=message)["Allow"] = ", ".join(allowed)
            await send(message)

        if scope["method"] in BODY_METHODS:
            receive = self._checked(receive, started)
        await self.app(scope, receive, send_allow)

    def _refused_up_front(self, scope: Scope, path: str) -> JSONResponse | None:
        length = _header(scope, b"content-length")
        if (
            self.max_body is not None
            and length is not None
            and length.isascii()
            and length.isdigit()
        ):
            if int(length) > self.max_body:
                return _refuse(413, self._too_large())
        if scope["method"] == "POST" and path.rstrip("/") in self.json_paths:
            # No token, or one that cannot be a token: 401 before the body is read and
            # parsed (up to MAX_REQUEST_BYTES of JSON on the event loop, for anyone).
            unauthorized = _unauthorized_up_front(_header(scope, b"authorization"))
            if unauthorized is not None:
                return unauthorized
            kind = _header(scope, b"content-type")
            media = (kind or "").split(";")[0].strip().lower()
            if kind is not None and media != "application/json" and not media.endswith("+json"):
                return _refuse(
                    415,
                    "the body must be JSON, sent as Content-Type: application/json"
                    f" (got {kind[:100]!r})",
                )
        return None

    def _too_large(self) -> str:
        return (
            f"the request body is over {self.max_body:,} bytes (MAX_REQUEST_BYTES);"
            " send fewer tasks a request"
        )

    def _checked(self, receive: Receive, started: list[bool]) -> Receive:
        """``receive`` counting the body's bytes and looking at its first four, gathered
        across chunks. A refusal is an HTTPException, raised where the app reads the body:
        FastAPI lets those through as they are, and answers them as JSON. Never once the
        response has started (a streaming response listens for the disconnect through
        ``receive``: raising there was an ASGI error)."""
        seen = 0
        head = b""

        async def checked() -> Message:
            nonlocal seen, head
            message = await receive()
            if message["type"] != "http.request" or started:
                return message
            chunk: bytes = message.get("body", b"")
            if len(head) < 4:
                head += chunk[: 4 - len(head)]
                if (len(head) == 4 or not message.get("more_body")) and _not_utf8(head):
                    raise HTTPException(400, "request bodies must be UTF-8 (RFC 8259)")
            seen += len(chunk)
            if self.max_body is not None and seen > self.max_body:
                raise HTTPException(413, self._too_large())
            return message

        return checked


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: text that cannot be UTF-8 (a lone
    surrogate, ``\\ud800``, which a JSON body may escape) is written as its escape instead
    of failing the response."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":"), allow_nan=False).encode("ascii")


#: An input echoed in a 422's detail longer than this (as JSON) is left out.
MAX_ECHOED_INPUT_CHARS = 1_000


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite numbers as strings: ``1e400`` is valid JSON, which Python
    reads as infinity, and a detail echoing it as ``Infinity`` is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _without_large_input(error: dict[str, Any]) -> dict[str, Any]:
    """``error`` with its ``input`` replaced by a note when it is long as JSON, or too
    deep to write at all (before jsonable_encoder, whose walk is recursive too)."""
    if "input" not in error:
        return error
    try:
        size = len(json.dumps(error["input"], default=str))
    except (TypeError, ValueError, RecursionError):
        return {**error, "input": "(not shown: nested too deep to write)"}
    if size > MAX_ECHOED_INPUT_CHARS:
        return {**error, "input": f"(not shown: {size:,} characters as JSON)"}
    return error


async def _on_invalid_request(request: Request, exc: Exception) -> Response:
    """FastAPI's 422, whose details echo the input, written so that any input can be: as
    JSON (non-finite numbers as strings), without inputs over MAX_ECHOED_INPUT_CHARS (a
    30 MB body sent as text/plain came back whole)."""
    if not isinstance(exc, RequestValidationError):
        raise exc
    errors = [
        _json_safe(e) for e in jsonable_encoder([_without_large_input(e) for e in exc.errors()])
    ]
    return AsciiJSONResponse({"detail": errors}, 422)


def install(
    app: FastAPI,
    only: Mapping[str, tuple[str, ...]] | None = None,
    *,
    max_body: int | None = None,
    json_paths: frozenset[str] = JSON_BODY_PATHS,
) -> None:
    """Register the handlers that turn outages into 503s, and the URL guard (``only``: paths
    that serve only these methods, whatever other routes their URL also matches;
    ``max_body``, ``json_paths``: GuardMiddleware's body checks)."""
    app.add_middleware(
        GuardMiddleware, routes=app, only=only, max_body=max_body, json_paths=json_paths
    )
    for kind in (*UNAVAILABLE, DBAPIError):
        app.add_exception_handler(kind, _on_dbapi_error)
    app.add_exception_handler(RequestValidationError, _on_invalid_request)
