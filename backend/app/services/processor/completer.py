"""Write outcomes: batched, one transaction per batch, retried until written, never dropped."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database, sqlstate
from app.services import faults, notifications, queue
from app.services.backoff import next_retry_delay
from app.services.processor.ahead import Room
from app.services.processor.executor import Outcome, OutcomeKind
from app.services.processor.looper import ErrorBackoff, is_transient
from app.services.queue import ClaimedTask
from app.text import error_line, storable

logger = logging.getLogger("app.processor")
MAX_BATCH = 500


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff settings for failed jobs."""

    base: float
    cap: float
    rng: random.Random | None = None

    def delay(self, retry_number: int) -> float:
        """Seconds before retry number ``retry_number``."""
        return next_retry_delay(retry_number, base=self.base, cap=self.cap, rng=self.rng)


_FINISH = {
    OutcomeKind.COMPLETED: queue.Finish.COMPLETE,
    OutcomeKind.FAILED: queue.Finish.FAIL,
    OutcomeKind.CANCELLED: queue.Finish.CANCEL,
    OutcomeKind.SNOOZED: queue.Finish.SNOOZE,
}


def _finished(outcome: Outcome, policy: RetryPolicy) -> queue.Finished:
    t = outcome.task
    return queue.Finished(
        t.id,
        t.attempt,
        _FINISH[outcome.kind],
        result=outcome.result,
        error=(outcome.error or "failed") if outcome.kind is OutcomeKind.FAILED else None,
        permanent=outcome.permanent,
        retry_delay=(
            policy.delay(t.retry_count + 1) if outcome.retry_delay is None else outcome.retry_delay
        ),
        snooze_seconds=outcome.snooze_seconds,
        duration_seconds=None if outcome.kind is OutcomeKind.SNOOZED else outcome.duration,
        token_usage=outcome.token_usage,
        ref=t.ref,
    )


async def write_outcomes(
    session: AsyncSession, outcomes: Sequence[Outcome], *, processor_id: str, policy: RetryPolicy
) -> list[bool]:
    """Write outcomes in the caller's transaction, the ends of attempts in one batch
    (``queue.finish_tasks``); each is True when written, False when the fence rejected it."""
    applied = [False] * len(outcomes)
    ends = [i for i, o in enumerate(outcomes) if o.kind in _FINISH]
    statuses = await queue.finish_tasks(
        session,
        processor_id=processor_id,
        items=[_finished(outcomes[i], policy) for i in ends],
    )
    for i, status in zip(ends, statuses, strict=True):
        applied[i] = status is not None
    for i, o in enumerate(outcomes):
        if o.kind is OutcomeKind.RELEASED:
            pair = [(o.task.id, o.task.attempt)]
            applied[i] = (
                await queue.release_tasks(session, processor_id=processor_id, tasks=pair) == 1
            )
    unstarted = [o.task.id for o, ok in zip(outcomes, applied, strict=True) if ok and not o.ran]
    await notifications.retract_started(session, unstarted)
    return applied


async def write_outcome(
    session: AsyncSession, outcome: Outcome, *, processor_id: str, policy: RetryPolicy
) -> bool:
    """Write one outcome in the caller's transaction; False when the fence rejected it."""
    [applied] = await write_outcomes(session, [outcome], processor_id=processor_id, policy=policy)
    return applied


class Refill(Protocol):
    """Claims work for free slots inside the completer's transaction, so that a job's end
    and the start of the next share one commit (the engine implements it)."""

    def reserve(self) -> Mapping[int, Room]:
        """Take the free slots and the claim-ahead room, per pool (empty when none, or when
        the daemon is stopping)."""

    async def claim(self, session: AsyncSession, slots: Mapping[int, Room]) -> list[ClaimedTask]:
        """Claim up to ``slots`` tasks in the caller's transaction (possibly on the database's
        write thread: it must not touch the event loop's objects)."""

    def settle(self, slots: Mapping[int, Room], claimed: Sequence[ClaimedTask]) -> None:
        """After the commit (or a failure, with nothing claimed): give the slots back and
        start what was claimed."""


class Completer:
    """Collects outcomes and writes them in batches. ``on_written`` is told each outcome and
    whether it applied, once it is durably decided."""

    def __init__(
        self,
        db: Database,
        *,
        processor_id: str,
        policy: RetryPolicy,
        on_written: Callable[[Outcome, bool], None],
        refill: Refill | None = None,
    ) -> None:
        self._db = db
        self._processor_id = processor_id
        self._policy = policy
        self._on_written = on_written
        self._pending: list[Outcome] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._backoff = ErrorBackoff("completer")
        self._batch_limit = MAX_BATCH
        self._refill = refill
        self._refill_ok = True

    @property
    def backlog(self) -> int:
        """Outcomes not yet written."""
        return len(self._pending)

    @property
    def busy(self) -> bool:
        """Outcomes are waiting or being written (and will claim for free slots)."""
        return not self._idle.is_set()

    async def wait_idle(self) -> None:
        """Until nothing is waiting to be written."""
        await self._idle.wait()

    def submit(self, outcome: Outcome) -> None:
        """Queue an outcome for writing (never blocks)."""
        if outcome.kind is OutcomeKind.LOST:
            self._on_written(outcome, False)
            return
        if outcome.kind is OutcomeKind.FAILED and not outcome.permanent:
            delay = self._policy.delay(outcome.task.retry_count + 1)
            outcome = dataclasses.replace(outcome, retry_delay=delay)
        self._pending.append(outcome)
        self._idle.clear()
        self._ready.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Write batches until ``stop`` is set and nothing is left."""
        while True:
            if not self._pending:
                self._idle.set()
                if stop.is_set():
                    return
                self._ready.clear()
                waiter = asyncio.ensure_future(self._ready.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            await self.run_once()

    async def run_once(self) -> int:
        """Write one batch (retrying after a pause on database errors); returns its size."""
        batch = self._pending[: self._batch_limit]
        try:
            applied = await self._write(batch)
        except Exception as exc:
            await self._handle_error(batch, exc)
            return 0
        self._backoff.succeeded()
        del self._pending[: len(batch)]
        if not self._pending:
            self._batch_limit = MAX_BATCH
        for outcome, ok in zip(batch, applied, strict=True):
            self._report(outcome, ok)
        return len(batch)

    async def flush(self) -> None:
        """Wait until every submitted outcome is written (bound it with asyncio.timeout)."""
        await self._idle.wait()

    async def _write(self, batch: Sequence[Outcome]) -> list[bool]:
        if (
            self._refill is None
            and self._db.dialect == "postgresql"
            and all(o.kind is OutcomeKind.COMPLETED for o in batch)
        ):
            # nothing to claim in the same transaction: on PostgreSQL, one statement
            faults.fault_point("inside_complete_txn")  # a death here writes nothing either
            items = [_finished(o, self._policy) for o in batch]
            async with self._db.engine.connect() as conn:
                statuses = await queue.complete_tasks_alone(
                    conn, processor_id=self._processor_id, items=items
                )
            if statuses is not None:
                faults.fault_point("after_complete_commit")
                return [status is not None for status in statuses]
        refill = self._refill if self._refill_ok else None
        slots = refill.reserve() if refill is not None else {}
        claimed: list[ClaimedTask] = []

        async def transaction(session: AsyncSession) -> tuple[list[bool], list[ClaimedTask]]:
            # May run on the database's write thread: plain data in and out.
            more: list[ClaimedTask] = []
            async with notifications.deferred(session):
                applied = await write_outcomes(
                    session, batch, processor_id=self._processor_id, policy=self._policy
                )
                if refill is not None and slots:
                    more = await refill.claim(session, slots)
            faults.fault_point("inside_complete_txn")
            return applied, more

        try:
            applied, claimed = await self._db.run_write(transaction)
        except BaseException:
            claimed = []
            # an unexpected error may come from the claim: write the next tries alone
            self._refill_ok = False
            raise
        finally:
            if refill is not None:
                refill.settle(slots, claimed)
        faults.fault_point("after_complete_commit")
        self._refill_ok = True
        return applied

    async def _handle_error(self, batch: list[Outcome], exc: Exception) -> None:
        if is_transient(exc):
            if sqlstate(exc) == STATEMENT_CANCELLED and len(batch) > 1:
                # a statement_timeout may be the batch's size: the next tries take half
                self._batch_limit = max(1, len(batch) // 2)
            await asyncio.sleep(self._backoff.failed(exc))
            return
        if len(batch) > 1:
            self._batch_limit = 1  # find the one outcome that cannot be written
            return
        outcome = batch[0]
        logger.error(
            "task %s: outcome could not be written (%s)",
            outcome.task.id,
            error_line(exc),
            extra={"action": "outcome_unwritable", "task_id": outcome.task.id},
        )
        if outcome.error is not None and outcome.error.startswith(_UNSTORABLE):
            self._pending.pop(0)  # even the failure cannot be stored: the rescuer will act
            self._on_written(outcome, False)
        else:
            self._pending[0] = _as_failure(outcome, exc)

    def _report(self, outcome: Outcome, applied: bool) -> None:
        if not applied:
            logger.warning(
                "task %s: outcome %s not written: this daemon no longer holds the job "
                "(its lease expired and it was rescued)",
                outcome.task.id,
                outcome.kind.value,
                extra={"action": "fenced", "task_id": outcome.task.id, "kind": outcome.task.kind},
            )
        self._on_written(outcome, applied)


_UNSTORABLE = "the job's outcome could not be stored"
STATEMENT_CANCELLED = "57014"


def _as_failure(outcome: Outcome, exc: Exception) -> Outcome:
    return Outcome(
        outcome.task,
        OutcomeKind.FAILED,
        outcome.duration,
        error=storable(f"{_UNSTORABLE}: {exc.__class__.__name__}: {exc}"[:2000]),
        permanent=True,
        token_usage=outcome.token_usage,
    )
