"""Progress from a running handler: the row always, a notification when the throttle allows."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from app.db import Database
from app.services import notifications, queue
from app.services.handlers import ProgressSink
from app.services.queue import ClaimedTask
from app.text import error_line

logger = logging.getLogger("app.processor")

#: After a progress write fails, the job's later reports are dropped for this long, doubling
#: with each failure up to PROGRESS_RETRY_MAX_SECONDS: a database that is down, locked or
#: hanging costs a handler one failed write per window (up to the driver's timeout), not
#: one per ``ctx.progress`` call. The first report after the window carries the latest
#: figures, so the row catches up once the database answers.
PROGRESS_RETRY_SECONDS = 1.0
PROGRESS_RETRY_MAX_SECONDS = 30.0


def progress_sink(
    db: Database,
    task: ClaimedTask,
    processor_id: str,
    clock: Callable[[], float] = time.monotonic,
) -> ProgressSink:
    """A sink writing ``task``'s progress (fenced, in its own short transaction). Progress is
    best effort: a database error is logged once, the job goes on, and reports are dropped
    until the back-off (above) has passed."""
    throttle = notifications.ProgressThrottle()
    retry_at = 0.0
    pause = 0.0
    dropped = 0

    async def sink(current: int, total: int | None, message: str | None) -> None:
        nonlocal retry_at, pause, dropped
        if pause and clock() < retry_at:
            dropped += 1
            return
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
            pause = min(PROGRESS_RETRY_MAX_SECONDS, pause * 2 or PROGRESS_RETRY_SECONDS)
            retry_at = clock() + pause
            logger.warning(
                "task %s: progress not recorded (%s); reports dropped for %.0f s",
                task.id,
                error_line(exc),
                pause,
                extra={"action": "progress_error", "task_id": task.id, "kind": task.kind},
            )
            if notify:
                throttle.forget()
            return
        if pause:
            logger.info(
                "task %s: progress recorded again (%d report(s) dropped meanwhile)",
                task.id,
                dropped,
                extra={"action": "progress_resumed", "task_id": task.id, "kind": task.kind},
            )
            pause = 0.0
            dropped = 0

    return sink
