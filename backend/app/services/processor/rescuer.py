"""Return jobs whose lease expired to pending, or fail them when their attempts are spent."""

from __future__ import annotations

import logging
from datetime import timedelta

from app.db import Database
from app.models.types import utcnow
from app.services import faults, queue
from app.services.queue import RescueResult

logger = logging.getLogger("app.processor")
RESCUE_INTERVAL_MIN_SECONDS = 0.5
RESCUE_INTERVAL_MAX_SECONDS = 30.0
DEAD_PROCESSOR_LEASES = 3


def rescue_interval(lease_seconds: float) -> float:
    """Half a lease, within [0.5 s, 30 s]."""
    return min(RESCUE_INTERVAL_MAX_SECONDS, max(RESCUE_INTERVAL_MIN_SECONDS, lease_seconds / 2))


class Rescuer:
    """Runs on every daemon; the statements are set-based, so running twice is harmless."""

    def __init__(self, db: Database, *, lease_seconds: float) -> None:
        self._db = db
        self._lease_seconds = lease_seconds
        self.interval = rescue_interval(lease_seconds)

    async def run_once(self) -> RescueResult:
        """One sweep, one transaction."""
        if faults.seeded("rescue"):  # test-only seeded bug (app.services.faults)
            return RescueResult((), (), ())
        stale_before = utcnow() - timedelta(seconds=DEAD_PROCESSOR_LEASES * self._lease_seconds)
        async with self._db.write_transaction() as session:
            result = await queue.rescue_expired(session)
            await queue.reap_processors(session, stale_before=stale_before)
        for task_id in result.rescued:
            logger.warning(
                "task %s: lease expired, back to pending",
                task_id,
                extra={"action": "rescued", "task_id": task_id},
            )
        for task_id in result.failed:
            logger.error(
                "task %s: lease expired with no attempts left: failed",
                task_id,
                extra={"action": "rescued_failed", "task_id": task_id},
            )
        return result
