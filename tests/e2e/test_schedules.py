"""Periodic jobs and snooze through real daemon processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select

from app.cron import Cron
from app.db import Database
from app.models import PendingAnalysis, ScheduleState
from app.services import queue
from tests.e2e.daemon import REPO, Api, Daemon, cli, create_token
from tests.helpers import eventually, notes_of, task_row

pytestmark = [pytest.mark.e2e]
Spawn = Callable[..., Daemon]
WITH_PROBE = "app.services.analysis,tests.e2e.job_handlers,tests.e2e.scheduled_handlers"


async def scheduled(db: Database, kind: str) -> list[Any]:
    async with db.read_transaction() as s:
        rows = await s.execute(
            select(
                PendingAnalysis.idempotency_key,
                PendingAnalysis.scheduled_at,
                PendingAnalysis.status,
                PendingAnalysis.payload,
                PendingAnalysis.priority,
            )
            .where(PendingAnalysis.kind == kind)
            .order_by(PendingAnalysis.scheduled_at)
        )
        return list(rows.all())


async def schedule_row(db: Database, kind: str) -> ScheduleState | None:
    async with db.read_transaction() as s:
        return (
            await s.scalars(select(ScheduleState).where(ScheduleState.kind == kind))
        ).one_or_none()


def enqueue_logs(daemons: list[Daemon], kind: str) -> int:
    return sum(d.log().count(f"schedule {kind}: enqueued task") for d in daemons)


async def test_several_daemons_enqueue_exactly_one_task_per_tick(
    db: Database, spawn: Spawn, engine_name: str
) -> None:
    """Every second, three daemons on PostgreSQL (two on SQLite) race for the tick."""
    n = 3 if engine_name == "postgresql" else 2
    daemons = [spawn(f"d{i}", handler_modules=WITH_PROBE, schedule_catch_up="3") for i in range(n)]

    async def ten_done() -> bool:
        rows = await scheduled(db, "cron_probe")
        return len(rows) >= 10 and all(r.status == "completed" for r in rows[:10])

    await eventually(ten_done, within=40, interval=0.1)
    for d in daemons:
        assert d.stop() == 0
    rows = await scheduled(db, "cron_probe")
    ticks = [r.scheduled_at for r in rows]
    first = ticks[0]
    # One task per second from the first tick to the last: no duplicate, no gap.
    assert ticks == [first + timedelta(seconds=i) for i in range(len(ticks))]
    assert [r.idempotency_key for r in rows] == [
        f"cron:cron_probe:{t.strftime('%Y-%m-%dT%H:%M:%SZ')}" for t in ticks
    ]
    assert {(json.dumps(r.payload), r.priority) for r in rows} == {('{"source": "decorator"}', 6)}
    state = await schedule_row(db, "cron_probe")
    assert state is not None
    assert (state.enqueued_total, state.last_tick, state.cron) == (
        len(rows),
        ticks[-1],
        "* * * * * *",
    )
    # Each task was enqueued (and logged) by exactly one daemon.
    assert enqueue_logs(daemons, "cron_probe") == len(rows)


async def test_a_schedule_from_the_setting_runs(db: Database, spawn: Spawn) -> None:
    daemon = spawn(schedules="noop=*/2 * * * * *")

    async def two_done() -> bool:
        rows = await scheduled(db, "noop")
        return len(rows) >= 2 and all(r.status == "completed" for r in rows)

    await eventually(two_done, within=20, interval=0.1)
    assert daemon.stop() == 0
    rows = await scheduled(db, "noop")
    assert all(r.scheduled_at.second % 2 == 0 for r in rows)
    assert rows[1].scheduled_at - rows[0].scheduled_at == timedelta(seconds=2)
    assert "scheduler: noop (*/2 * * * * *)" in daemon.log()


async def test_the_setting_turns_a_coded_schedule_off(db: Database, spawn: Spawn) -> None:
    daemon = spawn(handler_modules=WITH_PROBE, schedules="cron_probe=off")
    daemon.wait_for_log("processor ")
    await asyncio.sleep(2.5)
    assert daemon.stop() == 0
    assert await scheduled(db, "cron_probe") == []
    assert "scheduler:" not in daemon.log()


@pytest.mark.parametrize("catch_up", [1, 3])
async def test_a_daemon_back_after_years_enqueues_only_the_latest_missed_ticks(
    db: Database, spawn: Spawn, catch_up: int
) -> None:
    """The schedule last ran on 2015-01-01 (as if every daemon had been down since): a
    daemon starting now enqueues the latest missed tick (or the latest ``catch_up``)."""
    yearly = Cron.parse("0 0 1 1 *")
    async with db.write_transaction() as s:
        await s.execute(
            insert(ScheduleState).values(
                kind="noop",
                cron="0 0 1 1 *",
                last_tick=datetime(2015, 1, 1, tzinfo=UTC),
                enqueued_total=0,
                updated_at=datetime(2015, 1, 1, tzinfo=UTC),
            )
        )
    daemon = spawn(schedules="noop=0 0 1 1 *", schedule_catch_up=str(catch_up))

    async def done() -> list[Any]:
        rows = await scheduled(db, "noop")
        return rows if len(rows) >= catch_up and all(r.status == "completed" for r in rows) else []

    await eventually(done, within=20, interval=0.05)
    await asyncio.sleep(1)  # the scheduler has run since, and does not enqueue more
    assert daemon.stop() == 0
    expected = list(reversed(yearly.ticks_between(None, datetime.now(UTC), limit=catch_up)))
    assert [r.scheduled_at for r in await scheduled(db, "noop")] == expected
    state = await schedule_row(db, "noop")
    assert state is not None and (state.last_tick, state.enqueued_total) == (expected[-1], catch_up)


async def test_ticks_missed_while_down_are_not_flooded(
    db: Database, spawn: Spawn, tmp_path: Path
) -> None:
    first = spawn(handler_modules=WITH_PROBE)

    async def some(n: int) -> bool:
        return len(await scheduled(db, "cron_probe")) >= n

    await eventually(lambda: some(2), within=20, interval=0.05)
    assert first.stop() == 0
    before = [r.scheduled_at for r in await scheduled(db, "cron_probe")]
    await asyncio.sleep(4)  # four ticks or more pass with no daemon
    restarted_at = datetime.now(UTC)
    second = spawn(handler_modules=WITH_PROBE)
    await eventually(lambda: some(len(before) + 2), within=20, interval=0.05)
    assert second.stop() == 0
    after = [r.scheduled_at for r in await scheduled(db, "cron_probe")][len(before) :]
    # Nothing was enqueued for the seconds with no daemon; the first task after the restart
    # is the tick at the restart (the latest missed one), and the rest follow it.
    assert after[0] >= restarted_at.replace(microsecond=0) - timedelta(seconds=1)
    assert after[0] - before[-1] >= timedelta(seconds=4)
    assert after == [after[0] + timedelta(seconds=i) for i in range(len(after))]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"schedules": "noop=61 * * * *"},
            "invalid setting ASYNC_PROCESSOR_SCHEDULES='noop=61 * * * *': kind 'noop': "
            "'61 * * * *' is not a valid cron expression (Bad minute)",
        ),
        (
            {"schedules": "nope=* * * * *"},
            "ASYNC_PROCESSOR_SCHEDULES names kind 'nope', but no handler is registered for it",
        ),
        (
            {"handler_modules": "tests.e2e.bad_schedule_handlers"},
            "schedule of handler 'bad_cron': '*/5 * * *' is not a valid cron expression "
            "(Wrong number of fields)",
        ),
        ({"schedule_catch_up": "0"}, "invalid setting ASYNC_PROCESSOR_SCHEDULE_CATCH_UP='0'"),
    ],
    ids=["bad-cron-setting", "unknown-kind", "bad-cron-decorator", "bad-catch-up"],
)
async def test_a_bad_schedule_stops_the_daemon_with_exit_2(
    spawn: Spawn, env: dict[str, str], message: str
) -> None:
    daemon = spawn(**env)
    assert daemon.wait(30) == 2
    assert message in daemon.log()
    assert "Traceback" not in daemon.log()


async def test_schedules_in_status_cli_and_metrics(
    db: Database, spawn: Spawn, database_url: str, tmp_path: Path
) -> None:
    daemon = spawn(handler_modules=WITH_PROBE)

    async def two_done() -> bool:
        rows = await scheduled(db, "cron_probe")
        return len(rows) >= 2 and all(r.status == "completed" for r in rows)

    await eventually(two_done, within=20, interval=0.05)
    assert daemon.stop() == 0
    state = await schedule_row(db, "cron_probe")
    assert state is not None and state.last_task_id is not None
    last_task = await task_row(db, state.last_task_id)
    env = {"handler_modules": WITH_PROBE, "schedules": "noop=@daily"}
    api = Api(database_url, tmp_path, **env).start()
    try:
        admin = {"Authorization": f"Bearer {create_token(database_url, 'ops', admin=True)}"}
        user = {"Authorization": f"Bearer {create_token(database_url, 'u1')}"}
        base = f"{api.base}/api/async-analysis"
        async with httpx.AsyncClient(timeout=10) as http:
            listed = (await http.get(f"{base}/status", headers=admin)).json()["schedules"]
            assert "schedules" not in (await http.get(f"{base}/status", headers=user)).json()
            metrics = (await http.get(f"{api.base}/metrics")).text
    finally:
        api.stop()
    probe, noop = listed
    next_tick = datetime.fromisoformat(probe.pop("next_tick"))
    assert next_tick > state.last_tick
    assert probe == {
        "kind": "cron_probe",
        "cron": "* * * * * *",
        "description": Cron.parse("* * * * * *").describe(),
        "queue": "default",
        "catch_up": 1,
        "last_tick": state.last_tick.isoformat(),
        "last_task_id": state.last_task_id,
        "last_enqueued_at": state.last_enqueued_at and state.last_enqueued_at.isoformat(),
        "last_status": last_task.status,  # completed, or pending if enqueued as it stopped
        "enqueued_total": state.enqueued_total,
    }
    assert (noop["kind"], noop["cron"], noop["last_tick"], noop["enqueued_total"]) == (
        "noop",
        "@daily",
        None,
        0,
    )
    samples = {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in metrics.splitlines())
        if name.startswith("async_processor_schedule")
    }
    probe, noop_ = '{kind="cron_probe"}', '{kind="noop"}'
    next_probe = samples[f"async_processor_schedule_next_tick_timestamp_seconds{probe}"]
    next_noop = samples[f"async_processor_schedule_next_tick_timestamp_seconds{noop_}"]
    assert samples == {
        f"async_processor_scheduled_tasks_total{probe}": state.enqueued_total,
        f"async_processor_scheduled_tasks_total{noop_}": 0,
        f"async_processor_schedule_last_tick_timestamp_seconds{probe}": state.last_tick.timestamp(),
        f"async_processor_schedule_last_tick_timestamp_seconds{noop_}": 0,
        f"async_processor_schedule_next_tick_timestamp_seconds{probe}": next_probe,
        f"async_processor_schedule_next_tick_timestamp_seconds{noop_}": next_noop,
    }
    assert next_probe > state.last_tick.timestamp()
    assert next_noop % 86400 == 0
    cli_env = {
        "PYTHONPATH": str(REPO),
        "ASYNC_PROCESSOR_HANDLER_MODULES": WITH_PROBE,
        "ASYNC_PROCESSOR_SCHEDULES": "noop=@daily",
        "COLUMNS": "160",
    }
    as_json = json.loads(cli(database_url, "status", "--json", **cli_env))
    assert [s["kind"] for s in as_json["schedules"]] == ["cron_probe", "noop"]
    assert as_json["schedules"][0]["last_task_id"] == state.last_task_id
    table = cli(database_url, "status", **cli_env)
    assert "schedules" in table and "cron_probe" in table and "@daily" in table


# --- snooze ----------------------------------------------------------------------------------


async def test_snooze_runs_again_later_without_charging_a_retry(
    db: Database, spawn: Spawn, tmp_path: Path
) -> None:
    """A handler that snoozes twice for 1 s, with no retry budget at all, then completes."""
    runs = tmp_path / "runs.jsonl"
    async with db.write_transaction() as s:
        task = await queue.enqueue_task(
            s,
            kind="snooze_then_finish",
            user_id="u1",
            max_retries=0,
            payload={"runs": str(runs), "snoozes": 2, "seconds": 1.0},
        )
    daemon = spawn()

    async def snoozed() -> PendingAnalysis | None:
        # The runs file first: a row read before it could predate the first claim (the
        # daemon picks a job up within milliseconds) and look like the snoozed one.
        ran = len(runs.read_text().splitlines()) if runs.exists() else 0
        row = await task_row(db, task.id)
        return row if ran == 1 and row.status == "pending" else None

    row = await eventually(snoozed, within=20, interval=0.01)
    # Back to pending, scheduled a second later, with nothing charged.
    assert (row.attempts, row.retry_count, row.locked_by, row.error) == (0, 0, None, None)
    assert row.scheduled_at > row.updated_at + timedelta(seconds=0.9)

    async def completed() -> PendingAnalysis | None:
        row = await task_row(db, task.id)
        return row if row.status == "completed" else None

    row = await eventually(completed, within=20, interval=0.05)
    assert daemon.stop() == 0
    assert (row.attempts, row.retry_count, row.max_retries) == (1, 0, 0)
    assert row.result == {"runs": 3, "attempt": 1}
    starts = [json.loads(line) for line in runs.read_text().splitlines()]
    assert [s["attempt"] for s in starts] == [1, 1, 1]
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(starts)]
    assert all(gap >= 0.95 for gap in gaps), gaps
    # A snooze writes no notification: the job simply starts again.
    assert [t for t, _ in await notes_of(db, task.id)] == [
        "started",
        "started",
        "started",
        "completed",
    ]
