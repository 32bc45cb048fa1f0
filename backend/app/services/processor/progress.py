"""Progress from a running handler: the row always, a notification when the throttle allows."""

from __future__ import annotations

import logging

from app.db import Database
from app.services import notifications, queue
from app.services.handlers import ProgressSink
from app.services.queue import ClaimedTask

logger = logging.getLogger("app.processor")


def progress_sink(db: Database, task: ClaimedTask, processor_id: str) -> ProgressSink:
    """A sink writing ``task``'s progress (fenced, in its own short transaction). Progress is
    best effort: a database error is logged and the job goes on."""
    throttle = notifications.ProgressThrottle()

    async def sink(current: int, total: int | None, message: str | None) -> None:
        notify = throttle.should_notify(notifications.percent(current, total))
        try:
            async with db.write_transaction() as session:
                await queue.update_progress(
                    session,
                    task_id=task.id,
                    processor_id=processor_id,
                    attempt=task.attempt,
                    current=current,
                    total=total,
                    message=message,
                    notify=notify,
                )
        except Exception as exc:
            logger.warning(
                "task %s: progress not recorded (%s)",
                task.id,
                exc,
                extra={"action": "progress_error", "task_id": task.id, "kind": task.kind},
            )

    return sink
