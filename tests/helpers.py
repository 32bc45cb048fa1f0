"""Test helpers: poll until a condition holds, enqueue in bulk, read rows plainly."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import func, select

from app.db import Database
from app.models import AnalysisNotification, PendingAnalysis
from app.services import queue

R = TypeVar("R")


async def eventually(
    check: Callable[[], Awaitable[R]], *, within: float = 10.0, interval: float = 0.02
) -> R:
    """Await ``check`` until it returns a truthy value or raise after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s (last: {value!r})")
        await asyncio.sleep(interval)


async def task_row(db: Database, task_id: int) -> PendingAnalysis:
    """The task's row, freshly read."""
    async with db.read_transaction() as s:
        row = (await s.scalars(select(PendingAnalysis).where(PendingAnalysis.id == task_id))).one()
        return row


async def notes_of(db: Database, task_id: int) -> list[tuple[str, Any]]:
    """(type, user_id) of the task's notifications, oldest first."""
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(AnalysisNotification.type, AnalysisNotification.user_id)
            .where(AnalysisNotification.task_id == task_id)
            .order_by(AnalysisNotification.id)
        )
        return [tuple(r) for r in rows.all()]


async def enqueue_payloads(
    db: Database, kind: str, payloads: Sequence[dict[str, Any]], **spec: Any
) -> list[int]:
    """One task of ``kind`` per payload (user u1 unless ``spec`` says), in one transaction."""
    async with db.write_transaction() as s:
        results = await queue.enqueue_tasks(
            s, [{"kind": kind, "user_id": "u1", **spec, "payload": p} for p in payloads]
        )
    return [r.id for r in results]


async def enqueue_many(db: Database, kind: str, n: int, **spec: Any) -> list[int]:
    """``n`` tasks of ``kind``, payload ``{"n": i, **spec["payload"]}``."""
    extra = spec.pop("payload", {})
    return await enqueue_payloads(db, kind, [{"n": i, **extra} for i in range(n)], **spec)


async def statuses(db: Database) -> Counter[str]:
    """How many tasks are in each status."""
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(PendingAnalysis.status, func.count()).group_by(PendingAnalysis.status)
        )
        return Counter(dict(rows.all()))  # type: ignore[arg-type]


async def all_in(db: Database, status: str, n: int) -> bool:
    """True when exactly ``n`` tasks are in ``status``."""
    return (await statuses(db))[status] == n


@contextlib.contextmanager
def reaped_and_running_pids() -> Iterator[tuple[int, int]]:
    """The pid of a child that ran and was reaped (no process has it) and of a live one."""
    reaped = subprocess.Popen(["true"])
    reaped.wait()
    running = subprocess.Popen(["sleep", "60"])
    try:
        yield reaped.pid, running.pid
    finally:
        running.kill()
        running.wait()
