"""INLINE mode runs a job in the enqueuing process with the daemon's state changes."""

from __future__ import annotations

from datetime import timedelta

from app.config import load_settings
from app.db import Database
from app.models.types import utcnow
from app.services import queue
from app.services.handlers import REGISTRY, import_handler_modules
from app.services.inline import run_inline
from tests.helpers import notes_of, task_row

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
