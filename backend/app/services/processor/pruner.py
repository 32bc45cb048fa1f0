"""Delete finished jobs and read notifications past their retention, in short batches."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from app.config import MAX_SECONDS
from app.db import Database
from app.models.types import utcnow
from app.services import notifications, queue

logger = logging.getLogger("app.processor")
PRUNE_INTERVAL_SECONDS = 3600.0
PRUNE_MAX_BATCHES = 1_000


@dataclass(frozen=True, slots=True)
class PruneResult:
    """How many rows one run deleted."""

    tasks: int
    notifications: int
    processors: int = 0
    task_starts: int = 0


class Pruner:
    """Each batch is its own transaction, so the pruner never holds a long lock."""

    def __init__(
        self,
        db: Database,
        *,
        retention_days: float,
        failed_retention_days: float | None = None,
        batch_size: int = queue.PRUNE_BATCH_SIZE,
        interval: float = PRUNE_INTERVAL_SECONDS,
    ) -> None:
        if retention_days <= 0 or batch_size <= 0:
            raise ValueError(
                "retention_days and batch_size must be positive, "
                f"got {retention_days} and {batch_size}"
            )
        self._db = db
        self._retention = timedelta(days=retention_days)
        self._failed_retention = timedelta(days=failed_retention_days or retention_days)
        self._batch_size = batch_size
        self.interval = interval

    async def run_once(self) -> PruneResult:
        """Delete everything past retention, batch by batch."""
        now = utcnow()
        tasks = await self._drain(
            lambda s: queue.prune_finished(
                s,
                completed_before=now - self._retention,
                failed_before=now - self._failed_retention,
                batch_size=self._batch_size,
            )
        )
        notes = await self._drain(
            lambda s: notifications.prune_read(
                s, read_before=now - self._retention, batch_size=self._batch_size
            )
        )
        daemons = await self._drain(
            lambda s: queue.prune_processors(
                s, stopped_before=now - self._retention, batch_size=self._batch_size
            )
        )
        # No window a rate limit may have (up to MAX_SECONDS, a year) is cut short, on any
        # daemon: the claims of a limited kind trim its own starts; these are the starts of
        # kinds whose limit was removed.
        starts_kept = max(self._retention, timedelta(seconds=MAX_SECONDS))
        starts = await self._drain(
            lambda s: queue.prune_task_starts(
                s, started_before=now - starts_kept, batch_size=self._batch_size
            )
        )
        if tasks or notes or daemons or starts:
            logger.info(
                "pruned %d finished tasks, %d read notifications, %d stopped processors"
                " and %d rate-limit starts",
                tasks,
                notes,
                daemons,
                starts,
                extra={"action": "pruned"},
            )
        return PruneResult(tasks, notes, daemons, starts)

    async def _drain(self, step: Callable[[AsyncSession], Awaitable[int]]) -> int:
        total = 0
        for _ in range(PRUNE_MAX_BATCHES):
            async with self._db.write_transaction() as session:
                deleted = await step(session)
            total += deleted
            if deleted < self._batch_size:
                break
        return total
