"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__
from app.api import errors
from app.api.deps import finish_touches
from app.api.routes import dashboard, health, notifications, queues, status, tasks
from app.api.schemas import JSON_VALUE, JSON_VALUE_SCHEMA
from app.config import Settings, get_settings
from app.db import Database
from app.services import faults
from app.services.handlers import REGISTRY, import_handler_modules

API_PREFIX = "/api/async-analysis"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (read from the environment when None)."""
    settings = settings or get_settings()
    import_handler_modules(settings.handler_modules)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        faults.warn_if_armed(logging.getLogger("app.api"))
        app.state.db = Database.from_url(
            settings.database_url, pool_size=10, sqlite_synchronous=settings.sqlite_synchronous
        )
        app.state.stopping = asyncio.Event()
        restore = _tell_on_stop(app.state.stopping)
        try:
            yield
        finally:
            restore()
            await finish_touches(app.state.db)
            await app.state.db.dispose()

    app = FastAPI(
        title="async-processor",
        version=__version__,
        description="Enqueue analysis tasks, follow their progress, read notifications.",
        lifespan=lifespan,
        # `/tasks/` is a 404, not a 307 to an absolute http:// URL (wrong behind a TLS
        # proxy, and a browser drops Authorization across origins on the redirect)
        redirect_slashes=False,
    )
    app.state.settings = settings
    # /tasks/bulk takes POST only: without this, a GET would read "bulk" as a task id
    errors.install(
        app,
        only={f"{API_PREFIX}/tasks/bulk": ("POST",)},
        # room for one task of MAX_PAYLOAD_BYTES written with \uXXXX escapes, always
        max_body=max(settings.max_request_bytes, 6 * settings.max_payload_bytes + 65_536),
        json_paths=frozenset({f"{API_PREFIX}/tasks", f"{API_PREFIX}/tasks/bulk"}),
    )
    if settings.cors_origins:  # added last, so outermost: the guard's answers get CORS too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After"],
        )
    for router in (tasks.router, notifications.router, status.router, queues.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    _complete_openapi(app)
    return app


def _tell_on_stop(stopping: asyncio.Event) -> Callable[[], None]:
    """Set ``stopping`` when the server is told to stop (SIGTERM, SIGINT), before the
    server's own handler runs: open notification streams end at once, instead of holding
    the stop for uvicorn's graceful timeout and being cancelled with an ERROR and a
    traceback in the log at every restart. Returns what undoes it. A no-op where no
    Python handler is installed (an app served without uvicorn's signal handling)."""
    loop = asyncio.get_running_loop()
    chained: dict[int, Any] = {}

    def told(signum: int, frame: Any) -> None:
        try:
            loop.call_soon_threadsafe(stopping.set)
        except RuntimeError:  # the loop is closed: nothing streams any more
            pass
        chained[signum](signum, frame)

    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if not callable(current):
            continue
        try:
            signal.signal(signum, told)
        except ValueError:  # not the main thread
            continue
        chained[signum] = current

    def restore() -> None:
        for signum, previous in chained.items():
            if signal.getsignal(signum) is told:
                signal.signal(signum, previous)

    return restore


def worker_app() -> FastAPI:
    """The app of one ``async-processor api --workers N`` process: a fresh interpreter, so it
    reads the settings from the environment and sets its own logging up, as the parent did."""
    import os

    from app.logs import PROCESS_CONTEXT, setup_logging

    settings = get_settings()
    PROCESS_CONTEXT["worker_pid"] = str(os.getpid())  # which worker wrote a JSON log line
    setup_logging(settings.log_level, settings.log_format)
    return create_app(settings)


def _complete_openapi(app: FastAPI) -> None:
    """List the registered kinds in the OpenAPI document (TaskCreate.kind's enum), and add
    the JsonValue component that types a payload's values."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        components = schema["components"]["schemas"]
        components["TaskCreate"]["properties"]["kind"]["enum"] = REGISTRY.kinds()
        components[JSON_VALUE] = JSON_VALUE_SCHEMA
        _type_the_errors(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


#: Every error's body: ``detail``, a sentence, or (a 422 from validation) a list of the
#: problems, each with its ``loc``, ``msg`` and ``type``.
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["loc", "msg", "type"],
                        "properties": {
                            "loc": {"type": "array", "items": {}},
                            "msg": {"type": "string"},
                            "type": {"type": "string"},
                        },
                    },
                },
            ]
        }
    },
}


def _type_the_errors(schema: dict[str, Any]) -> None:
    """Give every 4xx and 5xx response the Problem body (they had a description only, and
    422 FastAPI's HTTPValidationError, whose list ``detail`` is a sentence on /tasks)."""
    components = schema["components"]["schemas"]
    components["Problem"] = PROBLEM_SCHEMA
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    problem = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for operations in schema["paths"].values():
        for operation in operations.values():
            for code, response in operation.get("responses", {}).items():
                if str(code)[0] in "45":
                    response["content"] = problem
