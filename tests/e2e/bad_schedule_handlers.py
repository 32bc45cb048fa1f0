"""A handler module with a bad cron expression: a daemon importing it exits 2."""

from __future__ import annotations

from app.services.handlers import JobContext, handler


@handler("bad_cron", cron="*/5 * * *")
async def bad_cron(ctx: JobContext) -> None:
    return None
