"""Claiming ahead of free slots (EngineConfig.prefetch_window), the engine in-process, on
both engines: short jobs are claimed ahead and start without a round trip; long ones never
are; what waits is released uncharged at shutdown or when it waited too long, and a cancel
request reaches it without running it."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app.config import parse_key_limits, parse_queues, parse_rate_limits
from app.db import Database, sqlite_path
from app.models import PendingAnalysis
from app.models.types import utcnow
from app.services import queue
from app.services.async_analysis_processor import (
    EngineConfig,
    ProcessorEngine,
    SlotPool,
)
from app.services.handlers import REGISTRY, import_handler_modules
from app.services.processor.executor import Outcome, StopReason
from app.services.processor.heartbeat import HeartbeatResult
from tests.helpers import eventually, notes_of, task_row

import_handler_modules(["tests.e2e.job_handlers"])


class _Probe(ProcessorEngine):
    """Records the most handlers running at once, the largest claim, the most jobs waiting
    in the claim-ahead buffer, every start, and any running or waiting job missing from
    the jobs whose leases the heartbeat renews."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.peak = self.largest_claim = self.most_waiting = 0
        self.starts: Counter[int] = Counter()
        self.unrenewed: list[tuple[str, list[int]]] = []

    def _start_job(self, task: queue.ClaimedTask, pool: SlotPool) -> None:
        super()._start_job(task, pool)
        self.peak = max(self.peak, self.in_flight)
        self.starts[task.id] += 1

    def settle(self, slots: Any, claimed: Sequence[queue.ClaimedTask]) -> None:
        self.largest_claim = max(self.largest_claim, len(claimed))
        super().settle(slots, claimed)
        self.most_waiting = max(self.most_waiting, self.waiting)
        self._check_held("settle")

    def _on_written(self, outcome: Outcome, applied: bool) -> None:
        super()._on_written(outcome, applied)
        self._check_held(outcome.kind.value)

    def _check_held(self, where: str) -> None:
        live = set(self._running) | {e[2] for p in self._pools for e in p.waiting}
        if live - set(self._held):
            self.unrenewed.append((where, sorted(live - set(self._held))))


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
    await _run_all(engine, db, ids, within=30)
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
    await _run_all(engine, db, ids, within=30)
    assert engine.largest_claim == 2 and engine.most_waiting == 0


async def test_shutdown_releases_what_waits_uncharged(db: Database, database_url: str) -> None:
    """What waited never started: its claim's `started` notification is taken back (its
    user saw "started" for a job that then waited, and "started" again when it ran); the
    jobs stopped while running keep theirs."""
    ids = await _enqueue(db, _fast_then_slow(20, 10, 30.0))
    slow = ids[20:]
    engine = _engine(db, database_url, concurrency=2, prefetch_window=0.1)
    await engine.start()
    try:
        await eventually(lambda: _waiting_and_running(engine, 8, 2), within=15)
        waiting = [entry[2] for pool in engine._pools for entry in pool.waiting]
        running = sorted(engine._running)
    finally:
        await engine.stop(grace=0.2)
    assert sorted(waiting + running) == slow
    for task_id in slow:
        row = await task_row(db, task_id)
        assert (row.status, row.attempts, row.locked_by) == ("pending", 0, None), task_id
    for task_id in waiting:
        assert await notes_of(db, task_id) == [], task_id
    for task_id in running:  # (the sleep handler reports progress)
        assert [t for t, _ in await notes_of(db, task_id)][:1] == ["started"], task_id
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
            assert await notes_of(db, task_id) == [], task_id
        assert (await task_row(db, first)).status == "processing"
        assert [t for t, _ in await notes_of(db, first)][:1] == ["started"]
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
    assert [t for t, _ in await notes_of(db, waiting)] == ["cancelled"]  # it never started


class _CancelledBeforeItsFirstStep(_Probe):
    """The heartbeat's cancel request lands right after a job is started, before its task
    took its first step."""

    def _start_job(self, task: queue.ClaimedTask, pool: SlotPool) -> None:
        super()._start_job(task, pool)
        if task.kind == "sleep":
            self._stop_job(task.id, StopReason.CANCEL_REQUESTED)


async def test_a_job_cancelled_before_its_first_step_is_written(
    db: Database, database_url: str
) -> None:
    """Cancelled before its first step, the job's coroutine never ran: no outcome was
    written and it stayed processing, held and renewed by its daemon, for good (from a
    review). Its end is written, as for a job that never started: no `started` left."""
    [task_id] = await _enqueue(db, [{"kind": "sleep", "payload": {"seconds": 30}}])
    config = EngineConfig(
        database_url=database_url, lease_seconds=3, shutdown_grace=1, prefetch_window=0
    )
    engine = _CancelledBeforeItsFirstStep(db, REGISTRY, config)
    await engine.start()
    try:
        await eventually(lambda: _all(db, [task_id], "cancelled"), within=10)

        async def settled() -> bool:
            return engine.in_flight == 0 and not engine._held

        await eventually(settled, within=5)
        assert engine.starts[task_id] == 1
    finally:
        await engine.stop(grace=0)
    row = await task_row(db, task_id)
    assert (row.status, row.locked_by, row.progress_message) == ("cancelled", None, None)
    assert [t for t, _ in await notes_of(db, task_id)] == ["cancelled"]


async def test_a_job_released_and_claimed_back_stays_held_and_runs_once(
    db: Database, database_url: str
) -> None:
    """Short jobs first, then longer low-priority ones behind them: some wait past the
    stale time while the pool still turns over. Whatever is released and claimed back
    (possibly in the very transaction that wrote the release) stays among the jobs whose
    leases are renewed, runs once, and every slot is given back."""
    ids = await _enqueue(db, _fast_then_slow(60, 40, 0.15))
    engine = _engine(db, database_url, concurrency=2, prefetch_window=0.1, lease_seconds=30)
    await _run_all(engine, db, ids, within=60)
    assert engine.unrenewed == []
    assert set(engine.starts) == set(ids) and set(engine.starts.values()) == {1}
    assert [p.running for p in engine._pools] == [0] and engine.processed == 100


async def test_a_job_snoozed_for_no_time_is_claimed_back_and_stays_held(
    db: Database, database_url: str, tmp_path: Any
) -> None:
    """Snooze(0): the job is pending again at once, so on SQLite the transaction that
    writes the snooze may claim it back; its new run keeps its lease renewed."""
    specs = [
        {
            "kind": "snooze_then_finish",
            "payload": {"runs": str(tmp_path / f"runs{i}"), "snoozes": 2, "seconds": 0},
        }
        for i in range(6)
    ]
    ids = await _enqueue(db, specs)
    engine = _engine(db, database_url, concurrency=2, prefetch_window=0.1, lease_seconds=30)
    await _run_all(engine, db, ids, within=30)
    assert engine.unrenewed == []
    assert set(engine.starts.values()) == {3}


async def test_a_heartbeat_report_about_an_earlier_claim_spares_the_job_claimed_back(
    db: Database, database_url: str
) -> None:
    """The heartbeat listed (X, n) as claim c1; before its report is handled, X was written
    (say snoozed for no time) and claimed back as c2, with the same id and attempt. A
    report that X was lost (its renewal ran while X was pending) is about c1: c2 keeps
    running and stays held. The same report about the claim it listed stops the job."""
    [task_id] = await _enqueue(db, [{"kind": "sleep", "payload": {"seconds": 30}}])
    engine = _engine(db, database_url, concurrency=1, prefetch_window=0, lease_seconds=30)
    await engine.start()
    try:
        await eventually(lambda: _waiting_and_running(engine, 0, 1), within=10)
        c2 = engine._held[task_id]
        lost = HeartbeatResult(frozenset(), frozenset({task_id}), frozenset({task_id}))

        async def report() -> HeartbeatResult:
            return lost

        engine.heartbeat.run_once = report  # type: ignore[method-assign]
        engine._renewing = {task_id: dataclasses.replace(c2)}  # the earlier claim c1
        await engine._heartbeat_once()
        await asyncio.sleep(0.1)
        assert engine.in_flight == 1 and engine._held[task_id] is c2
        engine._renewing = {task_id: c2}
        await engine._heartbeat_once()
        await eventually(lambda: _waiting_and_running(engine, 0, 0), within=5)
    finally:
        await engine.stop(grace=0)


async def test_kinds_with_rate_or_key_limits_are_never_claimed_ahead(
    db: Database, database_url: str
) -> None:
    """Their starts are counted when they are claimed: a job claimed ahead would start
    later than its window said. So they are claimed for free slots only."""
    ids = await _enqueue(
        db,
        [{"kind": "noop", "payload": {"n": i}} for i in range(60)]
        + [{"kind": "sleep", "payload": {"seconds": 0}, "chapter_id": f"c{i}"} for i in range(60)],
    )
    engine = _engine(
        db,
        database_url,
        concurrency=3,
        prefetch_window=0.1,
        rate_limits=parse_rate_limits("noop=10000/1s"),
        key_limits=parse_key_limits("sleep=chapter_id:1"),
    )
    await _run_all(engine, db, ids, within=60)
    assert engine.largest_claim <= 3 and engine.most_waiting == 0, engine.largest_claim


async def test_a_lease_at_risk_releases_what_waits(db: Database, database_url: str) -> None:
    """The heartbeat could not renew for most of a lease: jobs claimed ahead must not start
    on a lease that may be gone; they go back to pending, uncharged (fenced: a no-op if a
    rescuer took them meanwhile)."""
    ids = await _enqueue(db, _fast_then_slow(20, 6, 30.0))
    engine = _engine(db, database_url, concurrency=2, prefetch_window=0.1, lease_seconds=30)
    await engine.start()
    try:
        await eventually(lambda: _waiting_and_running(engine, 4, 2), within=15)
        async with db.write_transaction() as s:  # what is released stays pending
            await queue.set_queue_paused(s, "default", paused=True)

        async def failing() -> Any:
            raise OSError("database unreachable")

        engine.heartbeat.run_once = failing  # type: ignore[method-assign]
        engine.heartbeat.lease_at_risk = lambda: True  # type: ignore[method-assign]
        try:
            await engine._heartbeat_once()
        except OSError:
            pass
        assert engine.waiting == 0
        waiting = [i for i in ids[20:] if i not in engine._running]
        assert len(waiting) == 4
        await eventually(lambda: _all(db, waiting, "pending"), within=10)
        for task_id in waiting:
            assert (await task_row(db, task_id)).attempts == 0
            assert await notes_of(db, task_id) == [], task_id
    finally:
        await engine.stop(grace=0)


async def test_a_hung_heartbeat_stops_the_jobs_when_their_leases_lapse(
    db: Database, database_url: str
) -> None:
    """The heartbeat's statement hangs with no error (a partition: the packets go nowhere,
    the driver waits for its 30 s timeout). The leases lapse after one lease, and another
    daemon may run the jobs again from then: the daemon stops them on its own timer, not
    when the database at last answers (the fleet audit saw them run on 8 s beside the
    rescued run)."""
    ids = await _enqueue(db, [{"kind": "sleep", "payload": {"seconds": 60}} for _ in range(2)])
    engine = _engine(db, database_url, concurrency=2, prefetch_window=0, lease_seconds=2)
    await engine.start()
    hang = asyncio.Event()
    try:
        await eventually(lambda: _waiting_and_running(engine, 0, 2), within=15)
        async with db.write_transaction() as s:  # the rescued jobs stay pending
            await queue.set_queue_paused(s, "default", paused=True)

        async def hung() -> Any:
            await hang.wait()
            raise OSError("database unreachable")

        engine.heartbeat.run_once = hung  # type: ignore[method-assign]
        await eventually(lambda: _waiting_and_running(engine, 0, 0), within=10)
        assert engine.processed == 0 and engine.failed == 0
        # Stopped, not completed: the rows are the rescuer's (this daemon's own rescuer
        # still runs), back to pending for another run.
        await eventually(lambda: _all(db, ids, "pending"), within=10)
    finally:
        hang.set()
        await engine.stop(grace=0)


async def test_a_lapsed_lease_releases_what_waits_uncharged(
    db: Database, database_url: str
) -> None:
    """The heartbeat fails at once, again and again (connections refused): the lease watch
    stops the running jobs, and hands the jobs claimed ahead, which never ran, back to
    pending uncharged (as a lost lease they stayed processing until rescued, a retry
    charged, and a max_retries=0 job failed without having run; from this session's
    review)."""
    await _enqueue(db, _fast_then_slow(20, 6, 30.0))
    engine = _engine(db, database_url, concurrency=2, prefetch_window=0.5, lease_seconds=3)
    await engine.start()
    try:
        await eventually(lambda: _waiting_and_running(engine, 4, 2), within=15)
        waiting = [entry[2] for pool in engine._pools for entry in pool.waiting]
        async with db.write_transaction() as s:
            await queue.set_queue_paused(s, "default", paused=True)

        async def failing() -> Any:
            raise OSError("database unreachable")

        engine.heartbeat.run_once = failing  # type: ignore[method-assign]
        await eventually(lambda: _waiting_and_running(engine, 0, 0), within=10)
        await eventually(lambda: _all(db, waiting, "pending"), within=10)
        for task_id in waiting:
            row = await task_row(db, task_id)
            assert (row.attempts, row.retry_count, row.error) == (0, 0, None), task_id
            assert await notes_of(db, task_id) == [], task_id
    finally:
        await engine.stop(grace=0)


@pytest.mark.parametrize("engine_name", ["postgresql"])
async def test_the_lease_watch_counts_from_before_the_claim_began(
    db: Database, database_url: str
) -> None:
    """PostgreSQL stamps a claim's leases with now(), the transaction's start; a claim that
    waited on another daemon's flow lock for 2 s got a lease 2 s older than the watch
    thought (counted from after the commit), so the job would run on past its lease."""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "sleep", "payload": {"seconds": 60}}])
    engine = _engine(
        db,
        database_url,
        concurrency=1,
        prefetch_window=0,
        lease_seconds=30,
        rate_limits=parse_rate_limits("noop=5/1s"),
    )
    async with db.engine.connect() as other:  # another daemon's claim holds the kind's lock
        transaction = await other.begin()
        await other.execute(select(func.pg_advisory_xact_lock(queue._flow_lock_key("noop"))))

        async def release_later() -> None:
            await asyncio.sleep(2.0)
            await transaction.commit()

        releasing = asyncio.create_task(release_later())
        slots = engine.reserve()
        claimed = await engine._claim(slots)
        await releasing
    engine._start_job = lambda task, pool: None  # type: ignore[method-assign]
    engine.settle(slots, claimed)
    [task] = claimed
    async with db.read_transaction() as s:
        left = (
            await s.execute(
                select(
                    func.extract("epoch", PendingAnalysis.lease_expires_at - func.clock_timestamp())
                ).where(PendingAnalysis.id == task.id)
            )
        ).scalar_one()
    watch_left = engine._lease_from[task.id] + 30 - asyncio.get_running_loop().time()
    assert watch_left <= float(left) + 0.05, (watch_left, left)


async def test_a_result_waiting_to_be_written_is_not_taken_by_its_own_rescuer(
    db: Database, database_url: str
) -> None:
    """After an outage longer than a lease, a job that finished during it waits in the
    completer with its result; the daemon's own rescuer, when it got through first, took it
    back (run again, or failed with no attempts left: a result dropped by the only daemon
    there was). It leaves its own daemon's held jobs alone now; the result is written."""
    [task_id] = await _enqueue(db, [{"kind": "noop", "max_retries": 0}])
    engine = _engine(db, database_url, concurrency=1, prefetch_window=0, lease_seconds=30)
    write = engine.completer._write
    outage = asyncio.Event()

    async def unreachable(batch: Any) -> list[bool]:
        if not outage.is_set():
            raise OSError("database unreachable")
        return await write(batch)

    engine.completer._write = unreachable  # type: ignore[method-assign]
    await engine.start()
    try:
        await eventually(lambda: _finished_unwritten(engine, 1), within=10)
        async with db.write_transaction() as s:  # the outage outlived the lease
            await s.execute(
                update(PendingAnalysis)
                .where(PendingAnalysis.id == task_id)
                .values(lease_expires_at=PendingAnalysis.started_at)
            )
        assert (await engine.rescuer.run_once()).rescued == ()
        assert (await task_row(db, task_id)).status == "processing"
        outage.set()
        await eventually(lambda: _all(db, [task_id], "completed"), within=15)
        row = await task_row(db, task_id)
        assert (row.attempts, row.retry_count, row.error) == (1, 0, None)
    finally:
        outage.set()
        await engine.stop(grace=0)


@pytest.mark.parametrize("engine_name", ["sqlite"])
async def test_a_replaced_database_file_stops_the_daemon(
    db: Database, database_url: str, tmp_path: Path
) -> None:
    """The file was restored by `mv` under the running daemon, which went on claiming and
    completing in the old file, silently. Its heartbeat sees the file is another one and
    stops it as a fatal error (exit 1: systemd restarts it on the new file)."""
    engine = _engine(db, database_url, concurrency=1, lease_seconds=1.5)
    await engine.start()
    path = sqlite_path(database_url)
    assert path is not None
    copy = tmp_path / "restored.db"
    shutil.copyfile(path, copy)
    os.replace(copy, path)
    try:
        await asyncio.wait_for(engine.run_until_stopped(), timeout=15)
    finally:
        await engine.stop(grace=0)
    assert "was replaced while this process ran" in str(engine.fatal)


async def _finished_unwritten(engine: ProcessorEngine, n: int) -> bool:
    return engine.in_flight == 0 and engine.completer.backlog == n


async def _run_all(engine: ProcessorEngine, db: Database, ids: list[int], within: float) -> None:
    """Start the engine, wait until every job of ``ids`` completed, stop it."""
    await engine.start()
    try:
        await eventually(lambda: _all(db, ids, "completed"), within=within)
    finally:
        await engine.stop()


async def _all(db: Database, ids: list[int], status: str) -> bool:
    async with db.read_transaction() as s:
        statuses = await s.scalars(
            select(PendingAnalysis.status).where(PendingAnalysis.id.in_(ids))
        )
        return set(statuses) == {status}


async def _waiting_and_running(engine: ProcessorEngine, waiting: int, running: int) -> bool:
    return engine.waiting == waiting and engine.in_flight == running


async def test_retries_and_snoozes_run_when_due_not_at_the_next_poll(
    db: Database, database_url: str, tmp_path: Any
) -> None:
    """A job this daemon snoozes or retries wakes it when the job is due: with a poll
    interval of a minute, two snoozes of 0.3 s and two retries (backoff base 0.2 s) all run
    within seconds, each no earlier than it was due."""
    runs = tmp_path / "runs"
    [snoozed] = await _enqueue(
        db,
        [
            {
                "kind": "snooze_then_finish",
                "payload": {"runs": str(runs), "snoozes": 2, "seconds": 0.3},
            }
        ],
    )
    [failing] = await _enqueue(db, [{"kind": "fail", "max_retries": 2}])
    engine = _engine(
        db, database_url, concurrency=2, poll_interval=60, backoff_base=0.2, backoff_max=0.2
    )
    await engine.start()
    try:
        await eventually(lambda: _all(db, [snoozed], "completed"), within=20)
        await eventually(lambda: _all(db, [failing], "failed"), within=20)
    finally:
        await engine.stop()
    starts = [json.loads(line)["at"] for line in runs.read_text().splitlines()]
    assert len(starts) == 3
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(starts))
    assert (await task_row(db, failing)).attempts == 3
    assert engine.starts[failing] == 3


@pytest.mark.parametrize("queues", [None, "mail"])
async def test_tasks_scheduled_for_later_start_when_due_not_at_the_next_poll(
    db: Database, database_url: str, queues: str | None
) -> None:
    """Tasks enqueued for a moment ahead (one before the daemon starts, one while it idles)
    start when due, with a poll interval of a minute: the claim that found nothing asks
    when the next task of its queues is due and sets a timer. None starts early, and a
    task scheduled past the poll interval is left for the poll."""
    where = {"queue": queues} if queues else {}
    soon = utcnow() + timedelta(seconds=1)
    [before] = await _enqueue(db, [{"kind": "noop", "scheduled_at": soon, **where}])
    [far] = await _enqueue(
        db, [{"kind": "noop", "scheduled_at": utcnow() + timedelta(hours=1), **where}]
    )
    # a minute's poll; the default lease, so heartbeats (whose writes wake a SQLite daemon's
    # doorbell) come every 10 s
    engine = _engine(
        db,
        database_url,
        concurrency=2,
        poll_interval=60,
        lease_seconds=30,
        queues=parse_queues(queues) if queues else None,
    )
    await engine.start()
    try:
        await eventually(lambda: _all(db, [before], "completed"), within=10)
        later = utcnow() + timedelta(seconds=0.5)
        [idle] = await _enqueue(db, [{"kind": "noop", "scheduled_at": later, **where}])
        await eventually(lambda: _all(db, [idle], "completed"), within=10)
    finally:
        await engine.stop()
    for task_id, due in ((before, soon), (idle, later)):
        row = await task_row(db, task_id)
        assert row.started_at is not None and row.started_at >= due - timedelta(seconds=0.01)
        assert (row.started_at - due).total_seconds() < 2, (row.started_at, due)
    assert (await task_row(db, far)).status == "pending"


async def test_claims_that_find_nothing_ask_for_the_next_due_task_at_most_every_quarter_second(
    db: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon woken again and again with nothing to claim (many daemons sharing one
    NOTIFY) reads the next due time at most once per NEXT_DUE_MIN_GAP_SECONDS, and reads it
    again when the gap has passed."""
    from app.services import async_analysis_processor as engine_module

    asked: list[float] = []
    real = queue.next_due_in

    async def counting(*args: Any, **kw: Any) -> float | None:
        asked.append(asyncio.get_running_loop().time())
        return await real(*args, **kw)

    monkeypatch.setattr(queue, "next_due_in", counting)
    engine = _engine(db, database_url, concurrency=2, poll_interval=60, lease_seconds=30)
    await engine.start()
    try:
        await eventually(lambda: _len_at_least(asked, 1), within=10)
        first = len(asked)
        began = asyncio.get_running_loop().time()
        for _ in range(40):  # 40 empty claims within ~0.2 s (longer on a loaded machine)
            engine.wake()
            await asyncio.sleep(0.005)
        await asyncio.sleep(engine_module.NEXT_DUE_MIN_GAP_SECONDS + 0.2)
        elapsed = asyncio.get_running_loop().time() - began
    finally:
        await engine.stop()
    later = asked[first - 1 :]
    # one read per gap at most, however many claims: bounded by the time it took
    assert 2 <= len(later) <= 2 + elapsed / engine_module.NEXT_DUE_MIN_GAP_SECONDS, later
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert all(g >= engine_module.NEXT_DUE_MIN_GAP_SECONDS - 0.01 for g in gaps), gaps


async def _len_at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def test_a_task_scheduled_for_later_starts_when_due_beside_a_running_job(
    db: Database, database_url: str
) -> None:
    """A busy daemon with room left (one long job running, one slot free) starts a task
    scheduled two seconds ahead when it is due: the claim that took the long job and left
    room asks when the next task is due (it had waited for the poll, a minute here)."""
    due = utcnow() + timedelta(seconds=1.5)
    [long_job, later] = await _enqueue(
        db,
        [
            {"kind": "sleep", "payload": {"seconds": 20}},
            {"kind": "noop", "scheduled_at": due},
        ],
    )
    engine = _engine(db, database_url, concurrency=2, poll_interval=60, lease_seconds=30)
    await engine.start()
    try:
        await eventually(lambda: _all(db, [later], "completed"), within=10)
        assert (await task_row(db, long_job)).status == "processing"
    finally:
        await engine.stop(grace=0)
    row = await task_row(db, later)
    assert row.started_at is not None and row.started_at >= due - timedelta(seconds=0.01)
    assert (row.started_at - due).total_seconds() < 2, (row.started_at, due)
