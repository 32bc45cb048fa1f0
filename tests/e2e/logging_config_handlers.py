"""A handler module that configures logging as it is imported, the way an application's
settings module often does: ``logging.config.dictConfig`` with its default
``disable_existing_loggers=True`` (every logger that already exists and is not named in
the config is disabled) and a root handler of its own at WARNING. The daemon's loggers
existed by then: its job lines, warnings and errors had vanished from its log."""

from __future__ import annotations

import logging.config
import sys

from app.services.handlers import JobContext, handler

logging.config.dictConfig(
    {
        "version": 1,
        "formatters": {"app": {"format": "APPLOG %(levelname)s %(name)s: %(message)s"}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "stream": sys.stderr, "formatter": "app"}
        },
        "root": {"handlers": ["stderr"], "level": "INFO"},
    }
)


@handler("configured_noop")
async def configured_noop(ctx: JobContext) -> dict[str, int]:
    return {"n": ctx.payload.get("n", 0)}


@handler("configured_fail")
async def configured_fail(ctx: JobContext) -> None:
    raise RuntimeError("the failure the operator must see")
