"""Periodic jobs against the real databases, with a pinned clock: the scheduler's state
row, one task per tick, the catch-up rule, concurrent schedulers, the status overview."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, text

from app.cron import Cron
from app.db import Database
from app.models import PendingAnalysis, ScheduleState
from app.services import queue, schedules
from app.services.handlers import Schedule
from app.services.processor.scheduler import Scheduler

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
EVERY_FIVE = Schedule("report", Cron.parse("*/5 * * * *"), {"n": 1}, 7, "reports", 1)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


async def scheduled_tasks(db: Database) -> list[tuple[Any, ...]]:
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(
                PendingAnalysis.kind,
                PendingAnalysis.idempotency_key,
                PendingAnalysis.scheduled_at,
                PendingAnalysis.payload,
                PendingAnalysis.priority,
                PendingAnalysis.queue,
                PendingAnalysis.status,
            ).order_by(PendingAnalysis.id)
        )
        return [tuple(r) for r in rows.all()]


async def state(db: Database, kind: str) -> ScheduleState:
    async with db.read_transaction() as s:
        return (await s.scalars(select(ScheduleState).where(ScheduleState.kind == kind))).one()


async def test_one_task_per_tick_from_the_next_tick_on(db: Database) -> None:
    scheduler = Scheduler(db, [EVERY_FIVE])
    first = await scheduler.run_once(now=at(7))  # a new schedule: no task, starts now
    assert first is not None and first.enqueued == ()
    assert (await state(db, "report")).last_tick == at(5)
    assert await scheduler.run_once(now=at(9.99)) is None  # nothing due: no database access
    run = await scheduler.run_once(now=at(10))
    assert run is not None and [(e.tick, e.created) for e in run.enqueued] == [(at(10), True)]
    assert await scheduler.run_once(now=at(10.5)) is None
    await scheduler.run_once(now=at(15.01))
    assert await scheduled_tasks(db) == [
        ("report", "cron:report:2026-01-01T12:10:00Z", at(10), {"n": 1}, 7, "reports", "pending"),
        ("report", "cron:report:2026-01-01T12:15:00Z", at(15), {"n": 1}, 7, "reports", "pending"),
    ]
    row = await state(db, "report")
    assert (row.cron, row.last_tick, row.enqueued_total) == ("*/5 * * * *", at(15), 2)
    assert (row.last_task_id, row.last_enqueued_at) == (run.enqueued[0].task_id + 1, at(15.01))


async def test_a_daemon_back_from_downtime_enqueues_the_latest_missed_tick_only(
    db: Database,
) -> None:
    await Scheduler(db, [EVERY_FIVE]).run_once(now=at(0))
    # "Down" for three hours; a fresh daemon (no memory) starts.
    run = await Scheduler(db, [EVERY_FIVE]).run_once(now=at(181))
    assert run is not None
    assert [e.tick for e in run.enqueued] == [at(180)]
    assert [k for _, k, *_ in await scheduled_tasks(db)] == ["cron:report:2026-01-01T15:00:00Z"]


async def test_catch_up_enqueues_up_to_n_latest_missed_ticks(db: Database) -> None:
    catch_up = Schedule("report", EVERY_FIVE.cron, catch_up=3)
    await Scheduler(db, [catch_up]).run_once(now=at(0))
    await Scheduler(db, [catch_up]).run_once(now=at(181))
    assert [sched for _, _, sched, *_ in await scheduled_tasks(db)] == [at(170), at(175), at(180)]
    assert (await state(db, "report")).enqueued_total == 3


async def test_pruned_tasks_are_not_enqueued_again(db: Database) -> None:
    daily = Schedule("report", Cron.parse("0 3 * * *"), catch_up=1)
    await Scheduler(db, [daily]).run_once(now=at(0))
    await Scheduler(db, [daily]).run_once(now=at(24 * 60))  # 03:00 the next day
    async with db.write_transaction() as s:
        await s.execute(delete(PendingAnalysis))  # pruned, as after the retention
    run = await Scheduler(db, [daily]).run_once(now=at(24 * 60 + 5))  # a restart
    assert run is not None and run.enqueued == ()
    assert await scheduled_tasks(db) == []


async def test_an_existing_key_is_not_enqueued_twice(db: Database) -> None:
    """The idempotency key guards even when the state row is lost."""
    scheduler = Scheduler(db, [EVERY_FIVE])
    await scheduler.run_once(now=at(0))
    await scheduler.run_once(now=at(5))
    async with db.write_transaction() as s:
        await s.execute(
            ScheduleState.__table__.update().values(last_tick=at(0))  # type: ignore[attr-defined]
        )
    run = await Scheduler(db, [EVERY_FIVE]).run_once(now=at(5.5))
    assert run is not None and [(e.tick, e.created) for e in run.enqueued] == [(at(5), False)]
    assert len(await scheduled_tasks(db)) == 1
    assert (await state(db, "report")).enqueued_total == 1


async def test_a_tick_key_held_by_another_kind_is_reported(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A task of another kind holding a tick's key stood in for the tick: the scheduled
    task never ran and nothing said so. Users cannot take such keys any more (the API and
    the CLI refuse them); a task written by the library or SQL is reported."""
    scheduler = Scheduler(db, [EVERY_FIVE])
    await scheduler.run_once(now=at(0))
    async with db.write_transaction() as s:
        await queue.enqueue_tasks(
            s, [{"kind": "mallory", "idempotency_key": schedules.tick_key("report", at(5))}]
        )
    with caplog.at_level("WARNING", logger="app.scheduler"):
        run = await scheduler.run_once(now=at(5))
    assert run is not None and [(e.tick, e.created) for e in run.enqueued] == [(at(5), False)]
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "tick_key_taken"]
    assert "held by task" in record.getMessage() and "'mallory'" in record.getMessage()
    assert schedules.is_tick_key(schedules.tick_key("report", at(5)))
    assert not schedules.is_tick_key("cronjob-7") and not schedules.is_tick_key("my:cron:1")


async def test_a_changed_cron_starts_from_the_change(db: Database) -> None:
    hourly = Schedule("report", Cron.parse("0 * * * *"), catch_up=1)
    await Scheduler(db, [hourly]).run_once(now=at(0))  # last_tick 12:00
    every_ten = Schedule("report", Cron.parse("*/10 * * * *"), catch_up=1)
    run = await Scheduler(db, [every_ten]).run_once(now=at(35))  # 12:10..12:30 never ran
    assert run is not None and run.enqueued == ()
    row = await state(db, "report")
    assert (row.cron, row.last_tick) == ("*/10 * * * *", at(30))
    run = await Scheduler(db, [every_ten]).run_once(now=at(40))
    assert run is not None and [e.tick for e in run.enqueued] == [at(40)]


async def test_schedules_are_independent_and_share_one_transaction(db: Database) -> None:
    minutely = Schedule("a", Cron.parse("* * * * *"), catch_up=1)
    hourly = Schedule("b", Cron.parse("@hourly"), catch_up=1)
    scheduler = Scheduler(db, [minutely, hourly])
    await scheduler.run_once(now=at(-0.5))
    run = await scheduler.run_once(now=at(1))
    assert run is not None
    assert sorted((e.kind, e.tick) for e in run.enqueued) == [("a", at(1)), ("b", at(0))]
    assert [s.kind for s in scheduler.due(at(1.5))] == []
    assert [s.kind for s in scheduler.due(at(2))] == ["a"]


async def test_concurrent_schedulers_enqueue_each_tick_once(database_url: str) -> None:
    """Several daemons' schedulers (own connection pools) at the same ticks."""
    dbs = [Database.from_url(database_url) for _ in range(3)]
    try:
        per_second = Schedule("tick", Cron.parse("* * * * * *"), catch_up=1)
        workers = [Scheduler(d, [per_second]) for d in dbs]
        await workers[0].run_once(now=T0)
        for second in range(1, 21):
            now = T0 + timedelta(seconds=second, milliseconds=5)
            await asyncio.gather(*(w.run_once(now=now) for w in workers))
        tasks = await scheduled_tasks(dbs[0])
        expected = [T0 + timedelta(seconds=s) for s in range(1, 21)]
        assert [sched for _, _, sched, *_ in tasks] == expected
        assert (await state(dbs[0], "tick")).enqueued_total == 20
    finally:
        for d in dbs:
            await d.dispose()


async def test_first_runs_of_many_daemons_create_the_row_once(database_url: str) -> None:
    dbs = [Database.from_url(database_url) for _ in range(3)]
    try:
        workers = [Scheduler(d, [EVERY_FIVE]) for d in dbs]
        runs = await asyncio.gather(*(w.run_once(now=at(7)) for w in workers))
        assert all(r is not None and r.enqueued == () for r in runs)
        await asyncio.gather(*(w.run_once(now=at(10)) for w in workers))
        assert [k for _, k, *_ in await scheduled_tasks(dbs[0])] == [
            "cron:report:2026-01-01T12:10:00Z"
        ]
    finally:
        for d in dbs:
            await d.dispose()


async def test_overview_lists_next_tick_and_last_task(db: Database) -> None:
    other = Schedule("never_ran", Cron.parse("@daily"), catch_up=1)
    scheduler = Scheduler(db, [EVERY_FIVE])
    await scheduler.run_once(now=at(0))
    run = await scheduler.run_once(now=at(5))
    assert run is not None
    async with db.read_transaction() as s:
        listed = await schedules.overview(s, [EVERY_FIVE, other], now=at(6))
    assert listed == [
        {
            "kind": "report",
            "cron": "*/5 * * * *",
            "description": "Every fifth minute of every hour",
            "queue": "reports",
            "catch_up": 1,
            "next_tick": at(10).isoformat(),
            "last_tick": at(5).isoformat(),
            "last_task_id": run.enqueued[0].task_id,
            "last_enqueued_at": at(5).isoformat(),
            "last_status": "pending",
            "enqueued_total": 1,
        },
        {
            "kind": "never_ran",
            "cron": "@daily",
            "description": "At 00:00 every day",
            "queue": "default",
            "catch_up": 1,
            "next_tick": datetime(2026, 1, 2, tzinfo=UTC).isoformat(),
            "last_tick": None,
            "last_task_id": None,
            "last_enqueued_at": None,
            "last_status": None,
            "enqueued_total": 0,
        },
    ]


@pytest.mark.parametrize("pinned", [False, True])
async def test_the_database_clock_is_used_unless_pinned(db: Database, pinned: bool) -> None:
    every_second = Schedule("tick", Cron.parse("* * * * * *"), catch_up=1)
    scheduler = Scheduler(db, [every_second])
    first = await scheduler.run_once(now=T0 if pinned else None)
    assert first is not None
    if pinned:
        assert first.now == T0
    else:
        assert abs((first.now - datetime.now(UTC)).total_seconds()) < 5
    assert 0.0 < scheduler.delay() <= 1.0 or pinned


DOC = Path(__file__).resolve().parents[2] / "docs" / "scheduling.md"
RECIPES = re.findall(
    r"```sql\n\s*-- engine: (both|sqlite|postgresql)\n(.*?)```", DOC.read_text(), re.S
)


async def test_the_sql_recipes_of_the_scheduling_doc_run(db: Database, engine_name: str) -> None:
    assert [engine for engine, _ in RECIPES] == ["both", "postgresql", "sqlite"]
    nightly = Schedule("nightly_report", Cron.parse("0 3 * * *"), catch_up=2)
    await Scheduler(db, [nightly]).run_once(now=at(0))
    await Scheduler(db, [nightly]).run_once(now=at(24 * 60))  # 03:00 the next day
    results = []
    for engine, block in RECIPES:
        if engine not in ("both", engine_name):
            continue
        for statement in block.split(";"):
            if statement.strip() and not statement.strip().startswith("```"):
                async with db.write_transaction() as s:
                    result = await s.execute(text(statement))
                    results.append(result.all() if result.returns_rows else result.rowcount)
    state_row, tasks, updated = results
    assert [(r.kind, r.cron, r.status, r.enqueued_total) for r in state_row] == [
        ("nightly_report", "0 3 * * *", "pending", 1)
    ]
    assert [r.status for r in tasks] == ["pending"]
    assert updated == 1
    # The ticks since 2026-01-01 00:00 now count as missed: the latest two are enqueued
    # (the 03:00 one of 2026-01-01 is new; 2026-01-02 03:00 exists already).
    run = await Scheduler(db, [nightly]).run_once(now=at(24 * 60 + 1))
    assert run is not None
    assert [(e.tick, e.created) for e in run.enqueued] == [
        (datetime(2026, 1, 1, 3, tzinfo=UTC), True),
        (datetime(2026, 1, 2, 3, tzinfo=UTC), False),
    ]
