"""INLINE mode: run a job inside the enqueuing request, with the daemon's state changes.

For development and tests: the same plain claim, executor, fenced writes and notifications
as the daemon, and a heartbeat of its own while the job runs (its lease renewed every third
of a lease; a cancel request stops it at the next beat), only without a daemon. A job that
is not due yet (scheduled_at in the future) is left for a daemon, as is a failure's retry
after its backoff. Flow limits (RATE_LIMITS, KEY_LIMITS) are the daemons' claim's: a job run
inline is not held back by them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from app.config import Settings
from app.db import Database
from app.services import queue
from app.services.async_analysis_processor import new_processor_id
from app.services.handlers import HandlerRegistry
from app.services.processor.completer import RetryPolicy, write_outcome
from app.services.processor.executor import Executor, Outcome, StopReason
from app.services.processor.progress import progress_sink
from app.services.queue import ClaimedTask
from app.text import error_line

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
            lease_seconds=settings.lease_seconds,
            only_ids=[task_id],
        )
    if not claimed:
        return
    [task] = claimed
    policy = RetryPolicy(settings.retry_backoff_base, settings.retry_backoff_max)
    outcome = await _run_with_heartbeat(db, registry, task, processor_id, settings, policy)
    async with db.write_transaction() as session:
        await write_outcome(session, outcome, processor_id=processor_id, policy=policy)
    logger.info(
        "task %s: %s inline",
        task.id,
        outcome.kind.value,
        extra={"action": f"job_{outcome.kind.value}", "task_id": task.id, "kind": task.kind},
    )


async def _run_with_heartbeat(
    db: Database,
    registry: HandlerRegistry,
    task: ClaimedTask,
    processor_id: str,
    settings: Settings,
    policy: RetryPolicy,
) -> Outcome:
    """Run the handler while renewing its lease every third of a lease, as a daemon's
    heartbeat does: a job longer than a lease is not rescued and run again beside this run
    (its lease was PROCESSING_TIMEOUT plus a lease, never renewed, while a task's own
    timeout may be longer), and a cancel request, or a lease lost to a rescuer after the
    renewals failed for a whole lease, stops it."""
    reason: StopReason | None = None
    job = asyncio.create_task(
        Executor(registry).run(
            task, progress_sink=progress_sink(db, task, processor_id), stop_reason=lambda: reason
        )
    )
    renewed_at = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({job}, timeout=settings.lease_seconds / 3)
            if done:
                return job.result()
            if reason is StopReason.LEASE_LOST:
                continue  # not ours any more: wait for the handler to end
            started = time.monotonic()
            try:
                # A renewal that hangs (a partition) must not outlive the lease it renews.
                async with asyncio.timeout(settings.lease_seconds):
                    async with db.write_transaction() as session:
                        renewal = await queue.renew_leases(
                            session,
                            processor_id=processor_id,
                            tasks=[(task.id, task.attempt)],
                            lease_seconds=settings.lease_seconds,
                        )
            except Exception as exc:
                logger.warning("task %s: inline lease not renewed (%s)", task.id, error_line(exc))
                if time.monotonic() - renewed_at >= settings.lease_seconds:
                    reason = StopReason.LEASE_LOST
                    job.cancel()
                continue
            renewed_at = started
            if reason is not None:
                continue  # stopping (a cancel): the lease kept while the handler cleans up
            if task.id in renewal.cancel_requested:
                reason = StopReason.CANCEL_REQUESTED
                job.cancel()
            elif task.id not in renewal.renewed:
                reason = StopReason.LEASE_LOST
                job.cancel()
    finally:
        if not job.done():
            # The request itself was cancelled (a client's timeout, the API shutting down):
            # the job must not run on unowned, its lease no longer renewed, beside the run a
            # rescuer would start. Stop it and hand it back uncharged.
            reason = StopReason.SHUTDOWN
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            if not job.cancelled():
                async with db.write_transaction() as session:
                    await write_outcome(
                        session, job.result(), processor_id=processor_id, policy=policy
                    )
