"""INLINE mode runs a job in the enqueuing process with the daemon's state changes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from app.config import load_settings
from app.db import Database
from app.models.types import utcnow
from app.services import queue
from app.services.handlers import REGISTRY, import_handler_modules
from app.services.inline import run_inline
from tests.helpers import eventually, notes_of, task_row

import_handler_modules(["tests.e2e.job_handlers"])


async def enqueue(db: Database, kind: str, **spec: object) -> int:
    async with db.write_transaction() as s:
        return (await queue.enqueue_task(s, kind=kind, user_id="u", **spec)).id


async def test_inline_completes_with_progress_and_notifications(db: Database) -> None:
    settings = load_settings(database_url="sqlite+aiosqlite:///unused.db")
    task_id = await enqueue(db, "sleep", payload={"seconds": 0.01})
    await run_inline(db, REGISTRY, task_id, settings)
    row = await task_row(db, task_id)
    assert (row.status, row.attempts, row.locked_by, row.progress_current) == (
        "completed",
        1,
        None,
        2,
    )
    assert row.result is not None and row.result["slept"] == 0.01
    assert [t for t, _ in await notes_of(db, task_id)] == [
        "started",
        "progress",
        "progress",
        "completed",
    ]


async def test_inline_failure_is_retried_per_policy(db: Database) -> None:
    settings = load_settings(retry_backoff_base=0.01, retry_backoff_max=0.01)
    task_id = await enqueue(db, "fail", max_retries=1)
    await run_inline(db, REGISTRY, task_id, settings)
    row = await task_row(db, task_id)
    assert (row.status, row.retry_count) == ("pending", 1)
    assert row.error is not None and row.error.startswith("RuntimeError: boom on attempt 1")


async def test_inline_leaves_future_jobs_for_a_daemon(db: Database) -> None:
    task_id = await enqueue(db, "noop", scheduled_at=utcnow() + timedelta(hours=1))
    await run_inline(db, REGISTRY, task_id, load_settings())
    assert (await task_row(db, task_id)).status == "pending"


async def test_an_inline_job_longer_than_its_lease_keeps_it(db: Database) -> None:
    """Its lease was PROCESSING_TIMEOUT plus a lease and never renewed, while the task's
    own timeout may be longer: a daemon beside the API rescued the job and ran it again
    beside the inline run. The inline run now renews it like a daemon's heartbeat."""
    settings = load_settings(lease_seconds=0.6, processing_timeout=1)
    task_id = await enqueue(db, "sleep", payload={"seconds": 2.0}, timeout_seconds=10)
    running = asyncio.create_task(run_inline(db, REGISTRY, task_id, settings))
    for _ in range(25):  # a rescuer's sweeps while it runs: nothing lapses
        await asyncio.sleep(0.1)
        async with db.write_transaction() as s:
            assert (await queue.rescue_expired(s)).rescued == ()
    await running
    row = await task_row(db, task_id)
    assert (row.status, row.attempts) == ("completed", 1)


async def test_a_cancel_request_stops_an_inline_job(db: Database) -> None:
    """The inline run heard of no cancel: the job ran to its end and was stored completed,
    cancel_requested true. Its heartbeat now picks the request up, as a daemon's does."""
    settings = load_settings(lease_seconds=0.6)
    task_id = await enqueue(db, "sleep", payload={"seconds": 30.0})
    running = asyncio.create_task(run_inline(db, REGISTRY, task_id, settings))
    await eventually(lambda: _status(db, task_id, "processing"), within=5)
    async with db.write_transaction() as s:
        assert await queue.request_cancel(s, task_id) is queue.CancelOutcome.REQUESTED
    await asyncio.wait_for(running, timeout=5)
    assert (await task_row(db, task_id)).status == "cancelled"


async def _status(db: Database, task_id: int, status: str) -> bool:
    return (await task_row(db, task_id)).status == status


async def test_a_cancelled_request_stops_its_job_and_hands_it_back(db: Database) -> None:
    """A request cancelled while its job ran (a client's timeout, the API shutting down)
    left the handler running with no one renewing its lease: a rescuer would start it again
    beside it. The job is stopped and released, uncharged."""
    settings = load_settings(lease_seconds=0.6)
    before = set(asyncio.all_tasks())
    task_id = await enqueue(db, "sleep", payload={"seconds": 30.0})
    running = asyncio.create_task(run_inline(db, REGISTRY, task_id, settings))
    await eventually(lambda: _status(db, task_id, "processing"), within=5)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert left == [], left
    row = await task_row(db, task_id)
    assert (row.status, row.attempts, row.retry_count) == ("pending", 0, 0)
