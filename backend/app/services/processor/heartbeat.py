"""Renew the leases of held jobs, keep the processors row fresh, pick up cancel requests."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database
from app.models import ProcessorState
from app.services import faults, queue

logger = logging.getLogger("app.processor")


@dataclass(frozen=True, slots=True)
class ProcessorStats:
    """What the processors row shows about this daemon."""

    in_flight: int
    processed: int
    failed: int
    state: ProcessorState


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """One beat: renewed jobs, jobs no longer ours, and jobs whose cancel was requested."""

    renewed: frozenset[int]
    lost: frozenset[int]
    cancel_requested: frozenset[int]


class Heartbeat:
    """Every ``lease_seconds / 3``: one statement renews all held leases."""

    def __init__(
        self,
        db: Database,
        *,
        processor_id: str,
        lease_seconds: float,
        held: Callable[[], Sequence[tuple[int, int]]],
        stats: Callable[[], ProcessorStats],
        register: Callable[[AsyncSession], Awaitable[None]] | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        self._db = db
        self._processor_id = processor_id
        self.lease_seconds = lease_seconds
        self.interval = lease_seconds / 3
        self._held = held
        self._stats = stats
        self._register = register
        self.last_success = time.monotonic()

    async def run_once(self) -> HeartbeatResult:
        """Renew, touch the processors row; raises on database errors (the loop retries)."""
        held = list(self._held())
        stats = self._stats()
        async with self._db.write_transaction() as session:
            renewal = await queue.renew_leases(
                session,
                processor_id=self._processor_id,
                tasks=[] if faults.seeded("lease_renewal") else held,
                lease_seconds=self.lease_seconds,
            )
            faults.fault_point("inside_heartbeat_txn")
            touch = partial(
                queue.touch_processor,
                session,
                processor_id=self._processor_id,
                in_flight=stats.in_flight,
                processed=stats.processed,
                failed=stats.failed,
                state=stats.state,
            )
            if not await touch() and self._register is not None:
                # Deleted by hand (or pruned as stopped): a daemon missing from the status
                # views and from other daemons' sight runs on unseen. Back it goes.
                logger.warning(
                    "this daemon's processors row was gone (deleted?): registered again",
                    extra={"action": "reregistered", "processor_id": self._processor_id},
                )
                await self._register(session)
                await touch()
        self.last_success = time.monotonic()
        if faults.seeded("lease_renewal"):  # test-only seeded bug: renewed nothing, say all
            renewal = queue.LeaseRenewal(frozenset(t for t, _ in held), frozenset())
        lost = frozenset(task_id for task_id, _ in held) - renewal.renewed
        return HeartbeatResult(renewal.renewed, lost, renewal.cancel_requested)

    def lease_at_risk(self) -> bool:
        """True when no renewal succeeded for a whole lease: held jobs may be rescued."""
        return time.monotonic() - self.last_success >= self.lease_seconds
