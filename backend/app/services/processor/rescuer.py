"""Return jobs whose lease expired to pending, or fail them when their attempts are spent.

Jobs of a daemon that is gone from this machine (same boot, same PID namespace, no process
with its pid: app.services.processor.host) go back at once, leases or not: a daemon that a
supervisor restarts after a SIGKILL or a crash takes its predecessor's jobs back as it
starts, instead of a lease and a half later."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database
from app.services import faults, queue
from app.services.processor.host import pid_gone
from app.services.queue import RescueResult

logger = logging.getLogger("app.processor")
RESCUE_INTERVAL_MIN_SECONDS = 0.5
RESCUE_INTERVAL_MAX_SECONDS = 30.0


def rescue_interval(lease_seconds: float) -> float:
    """Half a lease, within [0.5 s, 30 s]."""
    return min(RESCUE_INTERVAL_MAX_SECONDS, max(RESCUE_INTERVAL_MIN_SECONDS, lease_seconds / 2))


class Rescuer:
    """Runs on every daemon; the statements are set-based, so running twice is harmless."""

    def __init__(
        self,
        db: Database,
        *,
        lease_seconds: float,
        processor_id: str = "",
        host_key: str | None = None,
        hostname: str = "",
        held: Callable[[], Collection[int]] = frozenset,
    ) -> None:
        """``processor_id``, ``host_key`` and ``hostname``: this daemon's, for finding the
        daemons gone from this machine (none are looked for without a key). ``held``: the
        ids of this daemon's jobs whose outcome waits to be written, which its own sweep
        leaves alone (below)."""
        self._held = held
        self._db = db
        self._lease_seconds = lease_seconds
        self._processor_id = processor_id
        self._host_key = host_key
        self._hostname = hostname
        self.interval = rescue_interval(lease_seconds)

    async def run_once(self) -> RescueResult:
        """One sweep, one transaction."""
        if faults.seeded("rescue"):  # test-only seeded bug (app.services.faults)
            return RescueResult((), (), ())
        silent = queue.DEAD_PROCESSOR_LEASES * self._lease_seconds
        async with self._db.write_transaction() as session:
            gone = await self._gone(session)
            owners = [processor_id for processor_id, _ in gone]
            # This daemon's jobs whose outcome waits to be written are not its rescuer's
            # to take: after an outage longer than a lease, a job that finished during it
            # waits in the completer with its result, and the sweep that got through first
            # took it back (run again, or failed with no attempts left: a result dropped by
            # the only daemon there was). They are written, fenced, when the database
            # answers; another daemon's rescuer may still take them. Running jobs whose
            # lease expired are taken as any others (a renewal that silently failed).
            spare = (self._processor_id, tuple(self._held())) if self._processor_id else None
            result = await queue.rescue_expired(session, gone=owners, spare=spare)
            await queue.reap_processors(session, silent_seconds=silent, gone=owners)
        for processor_id, pid in gone:
            logger.warning(
                "processor %s is gone (no process %d on this machine): its jobs go back now",
                processor_id,
                pid,
                extra={"action": "processor_gone"},
            )
        for task_id in result.rescued:
            why = "its daemon is gone" if task_id in result.gone else "lease expired"
            logger.warning(
                "task %s: %s, back to pending",
                task_id,
                why,
                extra={"action": "rescued", "task_id": task_id},
            )
        for task_id in result.failed:
            why = "its daemon is gone" if task_id in result.gone else "lease expired"
            logger.error(
                "task %s: %s with no attempts left: failed",
                task_id,
                why,
                extra={"action": "rescued_failed", "task_id": task_id},
            )
        return result

    async def _gone(self, session: AsyncSession) -> list[tuple[str, int]]:
        """(id, pid) of the processors of this machine whose process no longer exists."""
        if self._host_key is None:
            return []
        found = await queue.processors_on_host(
            session, host_key=self._host_key, hostname=self._hostname, besides=self._processor_id
        )
        return [(processor_id, pid) for processor_id, pid in found if pid_gone(pid)]
