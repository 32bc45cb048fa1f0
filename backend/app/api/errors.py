"""Error responses: JSON with a detail, and 503 while the database is unreachable."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

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
    400: {"description": "Malformed request body (not JSON, or not UTF-8)"},
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
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return _unavailable(request, exc)
    if isinstance(exc, UNAVAILABLE):
        return _unavailable(request, exc)
    raise exc


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route serves at ``path``."""
    methods: set[str] = set()
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Register the handlers that turn outages into 503s, and complete 405s' Allow header
    (Starlette lists only the first matching route's methods)."""

    @app.middleware("http")
    async def complete_allow(request: Request, call_next: Any) -> Any:
        if "\x00" in request.url.path or "%00" in request.url.query:
            return JSONResponse({"detail": "NUL characters are not allowed in URLs"}, 400)
        response = await call_next(request)
        if response.status_code == 405:
            response.headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return response

    for kind in (*UNAVAILABLE, DBAPIError):
        app.add_exception_handler(kind, _on_dbapi_error)
