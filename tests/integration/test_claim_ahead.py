"""Claiming ahead of free slots (EngineConfig.prefetch_window), the engine in-process, on
both engines: short jobs are claimed ahead and start without a round trip; long ones never
are; what waits is released uncharged at shutdown or when it waited too long, and a cancel
request reaches it without running it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from app.db import Database
from app.models import PendingAnalysis
from app.services import queue
from app.services.async_analysis_processor import (
    EngineConfig,
    ProcessorEngine,
    SlotPool,
)
from app.services.handlers import REGISTRY, import_handler_modules
from tests.helpers import eventually, notes_of, task_row

import_handler_modules(["tests.e2e.job_handlers"])


class _Probe(ProcessorEngine):
    """Records the most handlers running at once, the largest claim and the most jobs
    waiting in the claim-ahead buffer."""

    peak = 0
    largest_claim = 0
    most_waiting = 0

    def _start_job(self, task: queue.ClaimedTask, pool: SlotPool) -> None:
        super()._start_job(task, pool)
        self.peak = max(self.peak, self.in_flight)

    def settle(self, slots: Any, claimed: Sequence[queue.ClaimedTask]) -> None:
        self.largest_claim = max(self.largest_claim, len(claimed))
        super().settle(slots, claimed)
        self.most_waiting = max(self.most_waiting, self.waiting)


def _engine(db: Database, database_url: str, **config: Any) -> _Probe:
    settings: dict[str, Any] = {"lease_seconds": 3, "shutdown_grace": 1, **config}
    return _Probe(db, REGISTRY, EngineConfig(database_url=database_url, **settings))


async def _enqueue(db: Database, specs: list[dict[str, Any]]) -> list[int]:
    async with db.write_transaction() as s:
        return [r.id for r in await queue.enqueue_tasks(s, specs)]


def _fast_then_slow(fast: int, slow: int, seconds: float) -> list[dict[str, Any]]:
    """Short jobs first (they teach the daemon that jobs are short), then long ones."""
    return [{"kind": "noop", "priority": 10, "payload": {"n": i}} for i in range(fast)] + [
        {"kind": "sleep", "priority": 1, "payload": {"seconds": seconds}} for _ in range(slow)
    ]


async def test_short_jobs_are_claimed_ahead_and_each_runs_once(
    db: Database, database_url: str
) -> None:
    ids = await _enqueue(db, [{"kind": "noop", "payload": {"n": i}} for i in range(300)])
    engine = _engine(db, database_url, concurrency=4, prefetch_window=0.1)
    await engine.start()
    try:
        await eventually(lambda: _all(db, ids, "completed"), within=30)
    finally:
        await engine.stop()
    assert engine.processed == 300 and engine.peak == 4
    # claims took more than the free slots, and what waited stayed under the cap (25 a slot)
    assert 4 < engine.largest_claim <= 4 + 100, engine.largest_claim
    assert 0 < engine.most_waiting <= 100, engine.most_waiting
    for task_id in ids[::37]:
        assert [t for t, _ in await notes_of(db, task_id)] == ["started", "completed"]
        assert (await task_row(db, task_id)).attempts == 1


async def test_long_jobs_are_not_claimed_ahead(db: Database, database_url: str) -> None:
    """Two slots, 0.6 s jobs: 2 x 0.1 / 0.6 = 0.33 jobs within the window, so none ahead."""
    ids = await _enqueue(db, [{"kind": "sleep", "payload": {"seconds": 0.6}} for _ in range(6)])
    engine = _engine(db, database_url, concurrency=2, prefetch_window=0.1)
    await engine.start()
    try:
        await eventually(lambda: _all(db, ids, "completed"), within=30)
    finally:
        await engine.stop()
    assert engine.largest_claim == 2 and engine.most_waiting == 0


async def test_shutdown_releases_what_waits_uncharged(db: Database, database_url: str) -> None:
    ids = await _enqueue(db, _fast_then_slow(20, 10, 30.0))
    slow = ids[20:]
    engine = _engine(db, database_url, concurrency=2, prefetch_window=0.1)
    await engine.start()
    try:
        await eventually(lambda: _waiting_and_running(engine, 8, 2), within=15)
    finally:
        await engine.stop(grace=0.2)
    for task_id in slow:
        row = await task_row(db, task_id)
        assert (row.status, row.attempts, row.locked_by) == ("pending", 0, None), task_id
    assert engine.processed == 20


async def test_what_waits_too_long_goes_back_to_pending(db: Database, database_url: str) -> None:
    """One slot stuck in a long job: the two jobs claimed ahead behind it go back to pending
    after a second, uncharged, and are not claimed ahead again while no slot frees."""
    ids = await _enqueue(db, _fast_then_slow(10, 3, 30.0))
    first, *behind = ids[10:]
    engine = _engine(db, database_url, concurrency=1, prefetch_window=0.1)
    await engine.start()
    try:
        await eventually(lambda: _waiting_and_running(engine, 2, 1), within=15)
        await eventually(lambda: _all(db, behind, "pending"), within=5)
        await eventually(lambda: _waiting_and_running(engine, 0, 1), within=5)
        for task_id in behind:
            assert (await task_row(db, task_id)).attempts == 0
        assert (await task_row(db, first)).status == "processing"
    finally:
        await engine.stop(grace=0)


async def test_a_cancel_request_reaches_a_waiting_job(db: Database, database_url: str) -> None:
    """The heartbeat reports the request; the job is cancelled without running (no
    progress), with its notification."""
    ids = await _enqueue(db, _fast_then_slow(10, 3, 30.0))
    waiting = ids[-1]
    engine = _engine(
        db, database_url, concurrency=1, prefetch_window=0.3, lease_seconds=0.9
    )  # heartbeat every 0.3 s; a job waits up to 3 s
    await engine.start()
    try:
        await eventually(lambda: _waiting_and_running(engine, 2, 1), within=15)
        async with db.write_transaction() as s:
            assert await queue.request_cancel(s, waiting) == queue.CancelOutcome.REQUESTED
        await eventually(lambda: _all(db, [waiting], "cancelled"), within=2)
        assert engine.waiting == 1
    finally:
        await engine.stop(grace=0)
    row = await task_row(db, waiting)
    assert row.progress_total is None and row.locked_by is None
    assert [t for t, _ in await notes_of(db, waiting)] == ["started", "cancelled"]


async def _all(db: Database, ids: list[int], status: str) -> bool:
    async with db.read_transaction() as s:
        statuses = await s.scalars(
            select(PendingAnalysis.status).where(PendingAnalysis.id.in_(ids))
        )
        return set(statuses) == {status}


async def _waiting_and_running(engine: ProcessorEngine, waiting: int, running: int) -> bool:
    return engine.waiting == waiting and engine.in_flight == running
