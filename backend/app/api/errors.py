"""Error responses: JSON with a detail, and 503 while the database is unreachable."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
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
    503: {"description": "The database is unreachable; retry after Retry-After seconds"},
}


def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning(
        "database unavailable for %s %s: %s",
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


def _preflight(scope: Scope) -> bool:
    """A CORS preflight: for the CORS middleware inside the guard to answer."""
    return scope["method"] == "OPTIONS" and any(
        name == b"access-control-request-method" for name, _ in scope.get("headers", ())
    )


class GuardMiddleware:
    """Refuse URLs with NUL characters (400), answer 405 for a path in ``only`` (path →
    the methods it serves) asked with any other method, and complete 405s' Allow header
    (Starlette lists only the first matching route's methods).

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs
    every request through a task group and memory streams, which cost a POST /tasks ~15 %
    of its server time."""

    def __init__(
        self, app: ASGIApp, routes: FastAPI, only: Mapping[str, tuple[str, ...]] | None = None
    ) -> None:
        self.app = app
        self.routes = routes
        self.only = dict(only or {})

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

        async def send_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                allowed = list(only) if only is not None else allowed_methods(self.routes, scope)
                if allowed is not None:
                    MutableHeaders(scope=message)["Allow"] = ", ".join(allowed)
            await send(message)

        await self.app(scope, receive, send_allow)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: text that cannot be UTF-8 (a lone
    surrogate, ``\\ud800``, which a JSON body may escape) is written as its escape instead
    of failing the response."""

    def render(self, content: object) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


async def _on_invalid_request(request: Request, exc: Exception) -> Response:
    """FastAPI's 422, whose details echo the input, written so that any input can be."""
    if not isinstance(exc, RequestValidationError):
        raise exc
    errors = jsonable_encoder(exc.errors())
    return AsciiJSONResponse({"detail": errors}, 422)


def install(app: FastAPI, only: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Register the handlers that turn outages into 503s, and the URL guard (``only``: paths
    that serve only these methods, whatever other routes their URL also matches)."""
    app.add_middleware(GuardMiddleware, routes=app, only=only)
    for kind in (*UNAVAILABLE, DBAPIError):
        app.add_exception_handler(kind, _on_dbapi_error)
    app.add_exception_handler(RequestValidationError, _on_invalid_request)
