"""A periodic handler for the scheduler's real-process tests (loaded only by them: every
daemon that imports this module enqueues a task every second)."""

from __future__ import annotations

from typing import Any

from app.services.handlers import JobContext, handler


@handler("cron_probe", cron="* * * * * *", payload={"source": "decorator"}, priority=6)
async def cron_probe(ctx: JobContext) -> dict[str, Any]:
    return {"task_id": ctx.task_id}
