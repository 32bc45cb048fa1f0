"""INLINE mode: run a job inside the enqueuing process, with the daemon's state changes.

For development and tests: the same claim, executor, fenced writes and notifications as
the daemon, only without a daemon. A job that is not due yet (scheduled_at in the future)
is left for a daemon.
"""

from __future__ import annotations

import logging

from app.config import Settings
from app.db import Database
from app.services import queue
from app.services.async_analysis_processor import new_processor_id
from app.services.handlers import HandlerRegistry
from app.services.processor.completer import RetryPolicy, write_outcome
from app.services.processor.executor import Executor
from app.services.processor.progress import progress_sink

logger = logging.getLogger("app.processor")


async def run_inline(
    db: Database, registry: HandlerRegistry, task_id: int, settings: Settings
) -> None:
    """Claim ``task_id`` and run it to its outcome before returning."""
    processor_id = f"inline:{new_processor_id()}"
    async with db.write_transaction() as session:
        claimed = await queue.claim_tasks(
            session,
            processor_id=processor_id,
            limit=1,
            lease_seconds=settings.processing_timeout + settings.lease_seconds,
            only_ids=[task_id],
        )
    if not claimed:
        return
    [task] = claimed
    outcome = await Executor(registry).run(
        task, progress_sink=progress_sink(db, task, processor_id), stop_reason=lambda: None
    )
    policy = RetryPolicy(settings.retry_backoff_base, settings.retry_backoff_max)
    async with db.write_transaction() as session:
        await write_outcome(session, outcome, processor_id=processor_id, policy=policy)
    logger.info(
        "task %s: %s inline",
        task.id,
        outcome.kind.value,
        extra={"action": f"job_{outcome.kind.value}", "task_id": task.id, "kind": task.kind},
    )
