"""Enqueue periodic jobs: one task per tick of each schedule, whatever the number of daemons."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from app.db import Database
from app.models.types import utcnow
from app.services import schedules
from app.services.handlers import Schedule
from app.services.schedules import ScheduleRun

logger = logging.getLogger("app.processor")
NEVER = datetime.max.replace(tzinfo=UTC)
SCHEDULER_MAX_SLEEP_SECONDS = 30.0
SCHEDULER_MIN_SLEEP_SECONDS = 0.01


class Scheduler:
    """Runs on every daemon. Each run enqueues the ticks that are due in one transaction
    that locks the schedules' rows (so a tick is enqueued once), then sleeps until the
    next tick of any schedule (``delay()``), at most ``interval`` seconds. Between ticks
    it does not touch the database."""

    def __init__(
        self,
        db: Database,
        schedules: Sequence[Schedule],
        *,
        interval: float = SCHEDULER_MAX_SLEEP_SECONDS,
    ) -> None:
        if not schedules:
            raise ValueError("Scheduler needs at least one schedule")
        self._db = db
        self.schedules = list(schedules)
        self.interval = interval
        # The next tick of each schedule after the last tick its row records; None until
        # the row has been read (the first run reads every row).
        self._next: dict[str, datetime | None] = {s.kind: None for s in self.schedules}
        self._skew = timedelta(0)  # the database's clock minus this host's
        logger.info(
            "scheduler: %s",
            ", ".join(f"{s.kind} ({s.cron.expression})" for s in self.schedules),
            extra={"action": "scheduler_started"},
        )

    def _estimated_now(self) -> datetime:
        return utcnow() + self._skew

    def due(self, now: datetime) -> list[Schedule]:
        """The schedules whose next tick is at or before ``now`` (or not yet known)."""
        return [s for s in self.schedules if (n := self._next[s.kind]) is None or n <= now]

    def delay(self) -> float:
        """Seconds until the next tick of any schedule, within [0.01, ``interval``]."""
        known = [n for n in self._next.values() if n is not None]
        if len(known) < len(self._next):
            return SCHEDULER_MIN_SLEEP_SECONDS
        wait = (min(known) - self._estimated_now()).total_seconds() if known else self.interval
        return min(self.interval, max(SCHEDULER_MIN_SLEEP_SECONDS, wait))

    async def run_once(self, *, now: datetime | None = None) -> ScheduleRun | None:
        """Enqueue every due tick; None when nothing was due (no database access).
        ``now`` pins the clock (tests)."""
        due = self.due(now or self._estimated_now())
        if not due:
            return None
        host_before = utcnow()
        async with self._db.write_transaction() as session:
            run = await schedules.enqueue_due(
                session, due, now=now, change_grace=self.interval + 1.0
            )
        if now is None:
            self._skew = run.now - host_before
        by_kind = {s.kind: s for s in due}
        for kind, last_tick in run.last_ticks.items():
            self._next[kind] = by_kind[kind].cron.next_after(last_tick) or NEVER
        for tick in run.enqueued:
            if not tick.created:
                continue
            logger.info(
                "schedule %s: enqueued task %s for the tick %s",
                tick.kind,
                tick.task_id,
                tick.tick.isoformat(),
                extra={"action": "scheduled", "task_id": tick.task_id, "kind": tick.kind},
            )
        return run
