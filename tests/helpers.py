"""Test helpers: poll until a condition holds, read rows plainly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import select

from app.db import Database
from app.models import AnalysisNotification, PendingAnalysis

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
