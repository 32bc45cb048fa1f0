"""Error responses: JSON with a detail, and 503 while the database is unreachable."""

from __future__ import annotations

import asyncio
import logging

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


def install(app: FastAPI) -> None:
    """Register the handlers that turn outages into 503s."""
    for kind in (*UNAVAILABLE, DBAPIError):
        app.add_exception_handler(kind, _on_dbapi_error)
