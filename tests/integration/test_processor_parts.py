"""The daemon's parts through run_once(), and the engine in-process, on both engines."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import OperationalError

from app.db import Database
from app.models import AnalysisNotification, PendingAnalysis, Processor, ProcessorState
from app.models.types import utcnow
from app.services import queue
from app.services.async_analysis_processor import EngineConfig, ProcessorEngine, SlotPool
from app.services.handlers import REGISTRY, import_handler_modules
from app.services.processor import host
from app.services.processor.completer import Completer, RetryPolicy
from app.services.processor.executor import Outcome, OutcomeKind
from app.services.processor.heartbeat import Heartbeat, ProcessorStats
from app.services.processor.progress import progress_sink
from app.services.processor.pruner import Pruner
from app.services.processor.rescuer import Rescuer
from app.services.processor.waker import make_waker
from tests.helpers import eventually, notes_of, reaped_and_running_pids, task_row

import_handler_modules(["tests.e2e.job_handlers"])
PID = "proc-a"


async def claimed(db: Database, n: int = 1, **spec: object) -> list[queue.ClaimedTask]:
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "noop", "user_id": "u", **spec} for _ in range(n)])
        await queue.register_processor(
            s, processor_id=PID, hostname="h", pid=1, version="v", concurrency=3
        )
    async with db.write_transaction() as s:
        return await queue.claim_tasks(s, processor_id=PID, limit=n, lease_seconds=5)


def _engine(db: Database, database_url: str, **config: Any) -> ProcessorEngine:
    """An engine over ``db`` with the registered handlers and ``config``."""
    return ProcessorEngine(db, REGISTRY, EngineConfig(database_url=database_url, **config))


async def test_heartbeat_renews_and_reports_lost_and_cancelled(db: Database) -> None:
    a, b, c = await claimed(db, 3)
    async with db.write_transaction() as s:
        await queue.request_cancel(s, b.id)
        await queue.rescue_expired(s, now=utcnow() + timedelta(seconds=60))  # all three expire
        await queue.claim_tasks(s, processor_id=PID, limit=1, lease_seconds=5)  # a again, attempt 2
    held = [(a.id, 2), (b.id, b.attempt), (c.id, c.attempt)]
    beat = Heartbeat(
        db,
        processor_id=PID,
        lease_seconds=6,
        held=lambda: held,
        stats=lambda: ProcessorStats(3, 1, 0, ProcessorState.RUNNING),
    )
    result = await beat.run_once()
    assert result.renewed == {a.id} and result.lost == {b.id, c.id}
    assert not beat.lease_at_risk()


async def test_rescuer_and_pruner_run_once(db: Database) -> None:
    [t] = await claimed(db, max_retries=0)
    async with db.write_transaction() as s:
        await s.execute(
            update(PendingAnalysis).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    result = await Rescuer(db, lease_seconds=2).run_once()
    assert result.failed == (t.id,)
    async with db.write_transaction() as s:
        await s.execute(update(PendingAnalysis).values(completed_at=utcnow() - timedelta(days=30)))
    # rate-limit starts of a kind whose limit was removed: nothing else deletes them
    async with db.write_transaction() as s:
        await s.execute(
            insert(queue.STARTS),
            [
                {"kind": "gone", "started_at": utcnow() - timedelta(days=367)},
                {"kind": "gone", "started_at": utcnow() - timedelta(days=400)},
                # inside a year: a live limit's window may be that long (report=100/720h)
                {"kind": "kept", "started_at": utcnow() - timedelta(days=30)},
            ],
        )
    pruned = await Pruner(db, retention_days=14, batch_size=1).run_once()
    assert (pruned.tasks, pruned.notifications, pruned.task_starts) == (1, 0, 2)
    async with db.read_transaction() as s:
        kinds = (await s.execute(select(queue.STARTS.c.kind))).scalars().all()
    assert kinds == ["kept"]


@pytest.fixture
def pids() -> Iterator[tuple[int, int]]:
    """A pid no process has and one a live child has."""
    with reaped_and_running_pids() as found:
        yield found


async def test_rescuer_gives_back_at_once_the_jobs_of_a_daemon_gone_from_this_machine(
    db: Database, pids: tuple[int, int]
) -> None:
    """Daemons on this machine (same host key and hostname) whose pid no process has lose
    their jobs at the next sweep, long leases or not: back to pending, or failed when their
    attempts are spent, each with the "daemon gone" reason in its row and its
    notification; the processors row is stopped. A daemon whose process runs, another
    engine of this very process, one with another host key (a container, another
    machine), one with another hostname (a clone of a memory snapshot), one without a key
    and the sweeping daemon's own row keep theirs, and an expired lease in the same sweep
    keeps its own reason."""
    key = host.host_key()
    assert key is not None
    dead, alive = pids
    owners = {
        "gone": (key, dead, "h"),
        "alive": (key, alive, "h"),
        "twin": (key, os.getpid(), "h"),
        "elsewhere": ("another-boot/0:0", dead, "h"),
        "renamed": (key, dead, "clone"),
        "keyless": (None, dead, "h"),
        "me": (key, dead, "h"),
    }
    async with db.write_transaction() as s:
        for name, (owner_key, pid, hostname) in owners.items():
            await queue.register_processor(
                s,
                processor_id=name,
                hostname=hostname,
                pid=pid,
                version="v",
                concurrency=3,
                host_key=owner_key,
            )
    held: dict[str, list[int]] = {}
    for name in owners:
        async with db.write_transaction() as s:
            specs = [{"kind": "noop", "user_id": "u", "max_retries": n} for n in (3, 0)]
            await queue.enqueue_tasks(s, specs)
            claimed = await queue.claim_tasks(s, processor_id=name, limit=2, lease_seconds=60)
        held[name] = sorted(t.id for t in claimed)
    async with db.write_transaction() as s:  # one lease of a live daemon ran out
        await s.execute(
            update(PendingAnalysis)
            .where(PendingAnalysis.id == held["alive"][0])
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    rescuer = Rescuer(db, lease_seconds=60, processor_id="me", host_key=key, hostname="h")
    result = await rescuer.run_once()
    back, spent = held["gone"]
    assert (sorted(result.rescued), result.failed) == (sorted([back, held["alive"][0]]), (spent,))
    assert sorted(result.gone) == [back, spent]
    row = await task_row(db, back)
    assert (row.status, row.retry_count, row.locked_by) == ("pending", 1, None)
    assert row.error == queue.DAEMON_GONE_ERROR
    row = await task_row(db, spent)
    assert (row.status, row.error) == ("failed", queue.DAEMON_GONE_ERROR + "; no attempts left")
    expired = await task_row(db, held["alive"][0])
    assert (expired.status, expired.error) == ("pending", queue.LEASE_EXPIRED_ERROR)
    for name in ("alive", "twin", "elsewhere", "renamed", "keyless", "me"):
        for task_id in held[name][name == "alive" :]:
            row = await task_row(db, task_id)
            assert (row.status, row.locked_by, row.error) == ("processing", name, None)
    async with db.read_transaction() as s:
        notes = dict(
            (
                await s.execute(
                    select(AnalysisNotification.task_id, AnalysisNotification.message).where(
                        AnalysisNotification.type.in_(["retrying", "failed"])
                    )
                )
            ).all()
        )
        states = dict((await s.execute(select(Processor.id, Processor.state))).all())
    assert notes == {
        back: queue.DAEMON_GONE_ERROR + "; retrying.",
        spent: queue.DAEMON_GONE_ERROR,
        held["alive"][0]: queue.LEASE_EXPIRED_ERROR + "; retrying.",
    }
    assert states == {name: "stopped" if name == "gone" else "running" for name in owners}


async def test_completer_writes_batches_and_reports_fenced(db: Database) -> None:
    tasks = await claimed(db, 3)
    written: list[tuple[int, bool]] = []
    completer = Completer(
        db,
        processor_id=PID,
        policy=RetryPolicy(0.01, 0.01),
        on_written=lambda o, ok: written.append((o.task.id, ok)),
    )
    stale = Outcome(tasks[2], OutcomeKind.COMPLETED, 0.1, result=1)
    async with db.write_transaction() as s:
        await s.execute(
            update(PendingAnalysis)
            .where(PendingAnalysis.id == tasks[2].id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        await queue.rescue_expired(s)
    completer.submit(Outcome(tasks[0], OutcomeKind.COMPLETED, 0.1, result={"a": 1}))
    completer.submit(Outcome(tasks[1], OutcomeKind.FAILED, 0.1, error="e", permanent=True))
    completer.submit(stale)
    assert await completer.run_once() == 3
    assert written == [(tasks[0].id, True), (tasks[1].id, True), (tasks[2].id, False)]
    assert [(await task_row(db, t.id)).status for t in tasks] == ["completed", "failed", "pending"]
    assert completer.backlog == 0


async def test_completer_turns_an_unstorable_result_into_a_failure(
    db: Database, engine_name: str
) -> None:
    [t] = await claimed(db)
    completer = Completer(
        db, processor_id=PID, policy=RetryPolicy(0.01, 0.01), on_written=lambda o, ok: None
    )
    completer.submit(Outcome(t, OutcomeKind.COMPLETED, 0.1, result={"bad": "\x00" * 3}))
    for _ in range(3):
        await completer.run_once()
        if not completer.backlog:
            break
    row = await task_row(db, t.id)
    if engine_name == "postgresql":  # jsonb rejects NUL characters
        assert row.status == "failed" and (row.error or "").startswith(
            "the job's outcome could not"
        )
    else:
        assert row.status == "completed"


async def test_a_second_stop_leaves_outcomes_the_database_will_not_take(
    db: Database, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown waits for every outcome to be written, through an outage; a stop signal
    while it waits stops waiting (the jobs run again once their leases expire)."""
    [task] = await queue_ids(db, 1)
    engine = _engine(db, database_url, concurrency=1, lease_seconds=3, shutdown_grace=1)

    async def outage(_batch: Any) -> list[bool]:
        raise OperationalError("UPDATE", None, Exception("database is locked"))

    engine.completer._write = outage  # type: ignore[method-assign]
    await engine.start()
    try:
        await eventually(lambda: _started(db, task), within=10)
        engine.request_stop()
        await asyncio.sleep(0.5)
        assert not engine._stopped.is_set()  # still waiting to write the outcome
        engine.request_stop()
        async with asyncio.timeout(5):
            await engine.run_until_stopped()
    finally:
        await engine.stop()
    assert (await task_row(db, task)).status == "processing"
    assert "1 outcomes not written (another stop signal)" in caplog.text


async def queue_ids(db: Database, n: int) -> list[int]:
    async with db.write_transaction() as s:
        return [r.id for r in await queue.enqueue_tasks(s, [{"kind": "noop"}] * n)]


async def _started(db: Database, task_id: int) -> bool:
    return (await task_row(db, task_id)).status == "processing"


async def test_engine_drains_in_process(db: Database, database_url: str) -> None:
    async with db.write_transaction() as s:
        ids = [
            r.id
            for r in await queue.enqueue_tasks(
                s, [{"kind": "noop", "payload": {"n": i}} for i in range(50)]
            )
        ]
    engine = _engine(db, database_url, concurrency=5, lease_seconds=3, shutdown_grace=1)
    await engine.start()
    try:
        await eventually(lambda: _all_done(db, ids), within=30)
    finally:
        await engine.stop()
    assert engine.processed == 50 and engine.in_flight == 0
    assert [t for t, _ in await notes_of(db, ids[0])] == ["started", "completed"]


async def _all_done(db: Database, ids: list[int]) -> bool:
    rows = [await task_row(db, i) for i in ids]
    return all(r.status == "completed" for r in rows)


async def test_waker_fires_on_another_connections_commit(db: Database, database_url: str) -> None:
    woke = asyncio.Event()
    waker = make_waker(database_url, woke.set)
    assert waker is not None
    stop = asyncio.Event()
    runner = asyncio.create_task(waker.run(stop))
    await asyncio.sleep(0.3)
    woke.clear()
    async with db.write_transaction() as s:
        await queue.enqueue_task(s, kind="noop")
    await asyncio.wait_for(woke.wait(), timeout=5)
    stop.set()
    await runner


async def test_waker_hears_a_cancel_request_for_a_running_job(
    db: Database, database_url: str
) -> None:
    """A cancel request for a running job, committed by another connection, reaches the
    waker with its own word (on_cancel); new work and a pending job's cancel do not."""
    [running] = await claimed(db, 1)
    woke, cancels = asyncio.Event(), asyncio.Event()
    waker = make_waker(database_url, woke.set, cancels.set)
    assert waker is not None
    stop = asyncio.Event()
    runner = asyncio.create_task(waker.run(stop))
    try:
        await asyncio.sleep(0.3)
        woke.clear()
        async with db.write_transaction() as s:
            other = await queue.enqueue_task(s, kind="noop")
        await asyncio.wait_for(woke.wait(), timeout=5)
        async with db.write_transaction() as s:
            assert await queue.request_cancel(s, other.id) is queue.CancelOutcome.CANCELLED
        await asyncio.sleep(0.3)
        assert not cancels.is_set()
        woke.clear()
        async with db.write_transaction() as s:
            assert await queue.request_cancel(s, running.id) is queue.CancelOutcome.REQUESTED
        await asyncio.wait_for(cancels.wait(), timeout=5)
        assert woke.is_set()
    finally:
        stop.set()
        await runner


@pytest.mark.parametrize("window", [0.0, 0.1])
async def test_engine_never_runs_more_than_its_concurrency(
    db: Database, database_url: str, window: float
) -> None:
    """Claims from the claim loop and from the completer's refill share the slots: running
    handlers never exceed concurrency. Rows held in processing, with no claiming ahead: on
    SQLite the same bound (the completer claims as it writes the ends); on PostgreSQL the
    claim loop claims while ends are still being written, up to four daemons' worth of them
    (the backlog bound). Claiming ahead (window 0.1) adds at most 25 a slot to the rows
    held, never to the handlers running."""
    async with db.write_transaction() as s:
        ids = [
            r.id
            for r in await queue.enqueue_tasks(
                s,
                [{"kind": "sleep", "payload": {"seconds": 0.01 * (i % 6)}} for i in range(80)],
            )
        ]
    engine = _PeakEngine(
        db,
        REGISTRY,
        EngineConfig(
            database_url=database_url,
            concurrency=4,
            prefetch_window=window,
            lease_seconds=3,
            shutdown_grace=1,
        ),
    )
    held_max = 0
    await engine.start()
    try:
        async with asyncio.timeout(60):
            while not await _all_done(db, ids):
                async with db.read_transaction() as s:
                    held = await s.scalar(
                        select(func.count())
                        .select_from(PendingAnalysis)
                        .where(PendingAnalysis.status == "processing")
                    )
                held_max = max(held_max, held or 0)
                await asyncio.sleep(0.003)
    finally:
        await engine.stop()
    assert engine.processed == 80
    held_bound = (4 if db.dialect == "sqlite" else 20) + (100 if window else 0)
    assert engine.peak == 4 and held_max <= held_bound, (engine.peak, held_max)


class _PeakEngine(ProcessorEngine):
    """Records the most handlers ever running at once, at each start."""

    peak = 0

    def _start_job(self, task: queue.ClaimedTask, pool: SlotPool) -> None:
        super()._start_job(task, pool)
        self.peak = max(self.peak, self.in_flight)


async def test_claims_stop_while_a_daemons_worth_of_ends_waits_unwritten(
    db: Database, database_url: str
) -> None:
    """The completer is stuck (a slow or failing database): the daemon stops claiming once
    its unwritten ends reach four times its concurrency (PostgreSQL; SQLite at once), instead of
    running (and, after a crash, re-running) ever more finished jobs. Nothing is claimed
    ahead here (the window is 0), so the bound is exact."""
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(s, [{"kind": "noop", "payload": {"n": i}} for i in range(30)])
    engine = ProcessorEngine(
        db,
        REGISTRY,
        EngineConfig(
            database_url=database_url,
            concurrency=4,
            prefetch_window=0,
            lease_seconds=30,
            shutdown_grace=1,
        ),
    )
    release = asyncio.Event()
    write = engine.completer._write

    async def stuck(batch: Any, *args: Any) -> list[bool]:
        await release.wait()
        return await write(batch, *args)

    engine.completer._write = stuck  # type: ignore[method-assign]
    await engine.start()
    try:
        await eventually(lambda: _backlog_at_least(engine, 4), within=10)
        await asyncio.sleep(0.5)  # time for claims that should not happen
        async with db.read_transaction() as s:
            held = await s.scalar(
                select(func.count())
                .select_from(PendingAnalysis)
                .where(PendingAnalysis.status == "processing")
            )
        # SQLite waits for the completer at once; PostgreSQL claims until four daemons'
        # worth of ends (16) wait unwritten: fewer than 16 + 4 rows, never all 30.
        assert held is not None and 4 <= held <= (4 if db.dialect == "sqlite" else 19), held
        release.set()
        await eventually(lambda: _completed_count_is(db, 30), within=30)
    finally:
        release.set()
        await engine.stop()


async def _backlog_at_least(engine: ProcessorEngine, n: int) -> bool:
    return engine.completer.backlog >= n


async def _completed_count_is(db: Database, n: int) -> bool:
    async with db.read_transaction() as s:
        done = await s.scalar(
            select(func.count())
            .select_from(PendingAnalysis)
            .where(PendingAnalysis.status == "completed")
        )
    return done == n


async def test_a_failed_run_logs_a_warning_a_completed_one_info(
    db: Database, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """LOG_LEVEL=WARNING (a busy daemon's setting) still shows every failure, with its
    kind and its fate: retried (which retry, when) or failed for good."""
    async with db.write_transaction() as s:
        ok, bad, last, again = await queue.enqueue_tasks(
            s,
            [
                {"kind": "noop"},
                {"kind": "fail", "payload": {"permanent": True}},
                {"kind": "fail", "max_retries": 0},
                {"kind": "fail", "max_retries": 2},
            ],
        )
    engine = _engine(db, database_url, concurrency=2, lease_seconds=3, shutdown_grace=1)
    caplog.set_level(logging.INFO, logger="app.processor")
    await engine.start()
    try:
        await eventually(lambda: _all_ended(db, [ok.id, bad.id, last.id]), within=30)
        await eventually(lambda: _retried(db, again.id), within=30)
    finally:
        await engine.stop()
    ends = {
        (r.levelname, re.sub(r"\d+\.\d+ s", "_ s", r.getMessage()), getattr(r, "final", None))
        for r in caplog.records
        if getattr(r, "action", "") in ("job_completed", "job_failed")
    }
    assert ends == {
        ("INFO", f"task {ok.id} (noop): completed in _ s", None),
        (
            "WARNING",
            f"task {bad.id} (fail): failed in _ s, for good (permanent): PermanentError: bad input",
            True,
        ),
        (
            "WARNING",
            f"task {last.id} (fail): failed in _ s, for good (0 retries used):"
            " RuntimeError: boom on attempt 1",
            True,
        ),
        (
            "WARNING",
            f"task {again.id} (fail): failed in _ s, retry 1 of 2 in _ s:"
            " RuntimeError: boom on attempt 1",
            False,
        ),
    }


async def _retried(db: Database, task_id: int) -> bool:
    return (await task_row(db, task_id)).retry_count == 1


async def _all_ended(db: Database, ids: list[int]) -> bool:
    rows = [await task_row(db, i) for i in ids]
    return all(r.status in ("completed", "failed") for r in rows)


async def test_progress_backs_off_while_the_database_refuses_it(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed progress write drops the job's reports for a window that doubles with each
    failure, so a database that is down or locked costs the handler one failed write per
    window, not one per report; the first write after the window carries the latest
    figures and sends the notification the failed write could not."""
    [t] = await claimed(db)
    now = [0.0]
    sink = progress_sink(db, t, PID, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="app.processor")

    async def rename(old: str, new: str) -> None:
        async with db.write_transaction() as s:
            await s.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))

    async def progress_of() -> tuple[int | None, list[str]]:
        row = await task_row(db, t.id)
        return row.progress_current, [kind for kind, _ in await notes_of(db, t.id)]

    await sink(1, 10, "one")
    assert await progress_of() == (1, ["started", "progress"])
    await rename("pending_analysis", "pending_analysis_away")
    try:
        await sink(2, 10, "two")  # fails: reports dropped for 1 s
        now[0] = 0.9
        await sink(3, 10, "three")  # dropped without a try
        now[0] = 1.0
        await sink(4, 10, "four")  # fails again: 2 s
        now[0] = 2.9
        await sink(5, 10, "five")  # dropped
    finally:
        await rename("pending_analysis_away", "pending_analysis")
    assert await progress_of() == (1, ["started", "progress"])
    now[0] = 3.0
    await sink(6, 10, "six")
    assert await progress_of() == (6, ["started", "progress", "progress"])
    logged = [(r.action, r.getMessage()) for r in caplog.records if hasattr(r, "action")]
    assert [action for action, _ in logged] == [
        "progress_error",
        "progress_error",
        "progress_resumed",
    ]
    assert logged[0][1].endswith("); reports dropped for 1 s")
    assert "UPDATE" not in logged[0][1]  # one line, without the statement
    assert logged[1][1].endswith("); reports dropped for 2 s")
    assert logged[2][1] == f"task {t.id}: progress recorded again (2 report(s) dropped meanwhile)"


async def test_the_processors_row_says_draining_as_the_stop_begins(
    db: Database, database_url: str
) -> None:
    """Not at the next beat (a third of the lease later): `status` during a systemctl stop
    showed the daemon running, 0 in flight."""
    async with db.write_transaction() as s:
        [job] = await queue.enqueue_tasks(s, [{"kind": "sleep", "payload": {"seconds": 2}}])
    engine = _engine(db, database_url, concurrency=1, lease_seconds=30, shutdown_grace=5)
    await engine.start()
    try:
        await eventually(lambda: _status_is(db, job.id, "processing"), within=10)
        engine.request_stop()
        await eventually(lambda: _row_state(db, engine.processor_id, "draining", 1), within=2)
    finally:
        await engine.stop()
    assert await _row_state(db, engine.processor_id, "stopped", 0)


async def _status_is(db: Database, task_id: int, status: str) -> bool:
    return (await task_row(db, task_id)).status == status


async def _row_state(db: Database, processor_id: str, state: str, in_flight: int) -> bool:
    async with db.read_transaction() as s:
        row = (await s.scalars(select(Processor).where(Processor.id == processor_id))).one()
    return (row.state, row.in_flight) == (state, in_flight)
