"""Periodic jobs without a database: cron parsing, the tick rule with a pinned clock, the
decorator and the ASYNC_PROCESSOR_SCHEDULES setting."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from app.config import Settings, SettingsError, load_settings, parse_schedules
from app.cron import Cron, CronError
from app.services.handlers import HandlerRegistry, JobContext, Schedule, ScheduleError, handler
from app.services.processor.scheduler import Scheduler
from app.services.schedules import (
    plan_ticks,
    resolve_schedules,
    shown_schedules,
    task_spec,
    tick_key,
)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --- cron ------------------------------------------------------------------------------------


def test_cron_ticks_in_utc() -> None:
    cron = Cron.parse("*/5 * * * *")
    assert cron.next_after(at("2026-01-01T12:07:03")) == at("2026-01-01T12:10:00")
    assert cron.next_after(at("2026-01-01T12:10:00")) == at("2026-01-01T12:15:00")
    assert cron.latest_at_or_before(at("2026-01-01T12:10:00")) == at("2026-01-01T12:10:00")
    assert cron.latest_at_or_before(at("2026-01-01T12:09:59.999")) == at("2026-01-01T12:05:00")
    # A naive datetime is UTC; another offset is converted.
    assert cron.next_after(datetime(2026, 1, 1, 12, 7)) == at("2026-01-01T12:10:00")
    paris = datetime.fromisoformat("2026-01-01T13:07:00+01:00")
    assert cron.next_after(paris) == at("2026-01-01T12:10:00")


def test_ticks_between_walks_back_newest_first_and_stops_at_the_limit() -> None:
    cron = Cron.parse("*/5 * * * *")
    ticks = cron.ticks_between(at("2026-01-01T11:50:00"), at("2026-01-01T12:07:00"), limit=10)
    assert ticks == [at("2026-01-01T12:05"), at("2026-01-01T12:00"), at("2026-01-01T11:55")]
    # A year of missed per-second ticks costs `limit` steps.
    every_second = Cron.parse("* * * * * *")
    long = every_second.ticks_between(at("2025-01-01"), at("2026-01-01T00:00:00.5"), limit=3)
    assert long == [at("2026-01-01T00:00:00"), at("2025-12-31T23:59:59"), at("2025-12-31T23:59:58")]
    assert cron.ticks_between(None, at("2026-01-01T12:07"), limit=0) == []


@pytest.mark.parametrize(
    ("alias", "fields"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
    ],
)
def test_aliases(alias: str, fields: str) -> None:
    start = at("2026-03-04T05:06:07")
    assert Cron.parse(alias).next_after(start) == Cron.parse(fields).next_after(start)
    assert Cron.parse(alias.upper()).expression == alias.upper()


def test_six_fields_have_seconds_first() -> None:
    cron = Cron.parse("*/10 * * * * *")
    assert cron.has_seconds
    assert cron.next_after(at("2026-01-01T00:00:05")) == at("2026-01-01T00:00:10")
    assert not Cron.parse("0 3 * * *").has_seconds


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("", "empty cron expression"),
        ("61 * * * *", "Bad minute"),
        ("* * *", "Wrong number of fields"),
        ("* * * * * * *", "Wrong number of fields"),
        ("@often", "Wrong number of fields"),
        ("0 0 31 2 *", "Bad day-of-month"),
        ("every five minutes", "Wrong number of fields"),
    ],
)
def test_bad_expressions_say_why(expression: str, why: str) -> None:
    with pytest.raises(CronError, match=why) as info:
        Cron.parse(expression)
    if expression:
        assert repr(expression) in str(info.value)
    assert "5 fields" in str(info.value)


# --- the tick rule ------------------------------------------------------------------------


FIVE = Cron.parse("*/5 * * * *")


def test_a_new_schedule_starts_at_its_next_tick() -> None:
    plan = plan_ticks(FIVE, now=at("2026-01-01T12:07"), last_tick=None, catch_up=3)
    assert plan.ticks == ()
    assert plan.last_tick == at("2026-01-01T12:05")


def test_the_tick_that_is_due_is_enqueued_once() -> None:
    last = at("2026-01-01T12:05")
    assert plan_ticks(FIVE, now=at("2026-01-01T12:09:59"), last_tick=last, catch_up=1).ticks == ()
    plan = plan_ticks(FIVE, now=at("2026-01-01T12:10"), last_tick=last, catch_up=1)
    assert plan.ticks == (at("2026-01-01T12:10"),)
    assert plan.last_tick == at("2026-01-01T12:10")
    again = plan_ticks(FIVE, now=at("2026-01-01T12:10:30"), last_tick=plan.last_tick, catch_up=1)
    assert again.ticks == ()
    assert again.last_tick == at("2026-01-01T12:10")


def test_after_downtime_only_the_latest_missed_tick_by_default() -> None:
    last = at("2026-01-01T09:00")  # down for three hours: 36 ticks missed
    plan = plan_ticks(FIVE, now=at("2026-01-01T12:01:30"), last_tick=last, catch_up=1)
    assert plan.ticks == (at("2026-01-01T12:00"),)
    assert plan.last_tick == at("2026-01-01T12:00")


def test_catch_up_enqueues_the_latest_n_missed_ticks_oldest_first() -> None:
    last = at("2026-01-01T09:00")
    plan = plan_ticks(FIVE, now=at("2026-01-01T12:01"), last_tick=last, catch_up=4)
    assert plan.ticks == tuple(at(f"2026-01-01T{t}") for t in ("11:45", "11:50", "11:55", "12:00"))
    # Fewer missed ticks than the cap: all of them.
    plan = plan_ticks(FIVE, now=at("2026-01-01T09:11"), last_tick=last, catch_up=4)
    assert plan.ticks == (at("2026-01-01T09:05"), at("2026-01-01T09:10"))


def test_a_changed_cron_only_counts_a_tick_just_due() -> None:
    daily_at_4 = Cron.parse("0 4 * * *")
    last = at("2026-01-01T03:00")  # the old cron was "0 3 * * *"; changed at 10:00
    plan = plan_ticks(
        daily_at_4,
        now=at("2026-01-01T10:00"),
        last_tick=last,
        catch_up=1,
        cron_changed=True,
        change_grace=31,
    )
    assert plan.ticks == ()  # 04:00 today is not "missed": the schedule said 03:00 then
    assert plan.last_tick == at("2026-01-01T04:00")
    # A tick of the new cron that is due right now is enqueued.
    plan = plan_ticks(
        daily_at_4,
        now=at("2026-01-02T04:00:00.2"),
        last_tick=last,
        catch_up=1,
        cron_changed=True,
        change_grace=31,
    )
    assert plan.ticks == (at("2026-01-02T04:00"),)
    # With catch_up > 1, a frequent new cron still enqueues only the tick just due, not
    # the grace window's worth of ticks before it (:58, :00, :02 ... were back-filled).
    every_2s = Cron.parse("*/2 * * * * *")
    plan = plan_ticks(
        every_2s,
        now=at("2026-01-02T04:00:11"),
        last_tick=at("2026-01-02T03:59:58"),
        catch_up=10,
        cron_changed=True,
        change_grace=31,
    )
    assert plan.ticks == (at("2026-01-02T04:00:10"),)
    assert plan.last_tick == at("2026-01-02T04:00:10")


def test_tick_keys_are_iso_utc_seconds() -> None:
    tick = datetime.fromisoformat("2026-01-01T13:05:00+01:00")
    assert tick_key("report", tick.astimezone(UTC)) == "cron:report:2026-01-01T12:05:00Z"


# --- the scheduler's sleep ---------------------------------------------------------------------


async def test_scheduler_sleeps_until_the_next_tick_within_its_interval() -> None:
    registry = HandlerRegistry()

    @handler("every_minute", registry=registry, cron="* * * * *")
    async def every_minute(ctx: JobContext) -> None:
        return None

    [schedule] = resolve_schedules(registry)
    scheduler = Scheduler(db=None, schedules=[schedule], interval=30)  # type: ignore[arg-type]
    assert scheduler.delay() == 0.01  # state unknown: read it at once
    assert [s.kind for s in scheduler.due(at("2026-01-01T00:00"))] == ["every_minute"]
    now = datetime.now(UTC)
    scheduler._next["every_minute"] = now + timedelta(seconds=5)
    assert 4 < scheduler.delay() <= 5
    assert scheduler.due(now) == []
    scheduler._next["every_minute"] = now + timedelta(hours=1)
    assert scheduler.delay() == 30
    scheduler._next["every_minute"] = now - timedelta(seconds=1)
    assert scheduler.delay() == 0.01
    await asyncio.sleep(0)


# --- declaring schedules ----------------------------------------------------------------------


def test_the_decorator_declares_a_schedule_and_keeps_the_plain_form() -> None:
    registry = HandlerRegistry()

    @handler("plain", registry=registry)
    async def plain(ctx: JobContext) -> None:
        return None

    @handler(
        "report",
        registry=registry,
        cron="0 3 * * *",
        payload={"period": "day"},
        priority=8,
        queue="reports",
        catch_up=2,
    )
    def report(ctx: JobContext) -> None:
        return None

    assert registry.kinds() == ["plain", "report"]
    [schedule] = registry.schedules()
    assert schedule == Schedule(
        "report", Cron.parse("0 3 * * *"), {"period": "day"}, 8, "reports", 2
    )
    spec = task_spec(schedule, at("2026-01-01T03:00"))
    assert (spec.kind, spec.payload, spec.priority, spec.queue) == (
        "report",
        {"period": "day"},
        8,
        "reports",
    )
    assert (spec.scheduled_at, spec.idempotency_key) == (
        at("2026-01-01T03:00"),
        "cron:report:2026-01-01T03:00:00Z",
    )


def test_the_decorator_rejects_a_bad_schedule_at_import() -> None:
    registry = HandlerRegistry()
    with pytest.raises(ScheduleError, match=r"schedule of handler 'x': '61 \* \* \* \*'.*Bad"):
        handler("x", registry=registry, cron="61 * * * *")
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ScheduleError, match="catch_up must be a whole number >= 1"):
            handler("x", registry=registry, cron="* * * * *", catch_up=bad)  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="need cron="):
        handler("x", registry=registry, payload={"a": 1})
    with pytest.raises(ScheduleError, match="need cron="):
        handler("x", registry=registry, max_retries=0)
    assert registry.kinds() == []


def test_scheduled_tasks_take_the_retry_and_timeout_settings() -> None:
    """A scheduled task is a normal task: without its own max_retries and timeout_seconds it
    gets the MAX_RETRIES and PROCESSING_TIMEOUT settings (it got 3 and 600 whatever they
    said), and a schedule that sets its own keeps them."""
    registry = HandlerRegistry()

    @handler("plain", registry=registry, cron="* * * * *")
    @handler("own", registry=registry, cron="* * * * *", max_retries=7, timeout_seconds=5)
    async def any_kind(ctx: JobContext) -> None:
        return None

    settings = Settings(max_retries=0, processing_timeout=1, schedule_catch_up=2)
    resolved = {s.kind: s for s in shown_schedules(registry, settings)}
    tick = datetime(2026, 1, 1, tzinfo=UTC)
    plain, own = task_spec(resolved["plain"], tick), task_spec(resolved["own"], tick)
    assert (plain.max_retries, plain.timeout_seconds, resolved["plain"].catch_up) == (0, 1, 2)
    assert (own.max_retries, own.timeout_seconds) == (7, 5)
    with pytest.raises(ScheduleError, match="invalid timeout_seconds: 0"):

        @handler("bad", registry=registry, cron="* * * * *", timeout_seconds=0)
        async def bad(ctx: JobContext) -> None:
            return None

        resolve_schedules(registry)


def test_setting_entries_override_add_and_turn_off() -> None:
    registry = HandlerRegistry()

    @handler("a", registry=registry, cron="*/5 * * * *", payload={"x": 1}, catch_up=3)
    @handler("b", registry=registry, cron="@hourly")
    @handler("c", registry=registry)
    async def any_kind(ctx: JobContext) -> None:
        return None

    overrides = parse_schedules("a=0 * * * *; b=off ;c=@daily")
    resolved = {s.kind: s for s in resolve_schedules(registry, overrides, default_catch_up=2)}
    assert sorted(resolved) == ["a", "c"]
    assert (resolved["a"].cron.expression, resolved["a"].payload, resolved["a"].catch_up) == (
        "0 * * * *",
        {"x": 1},
        3,
    )
    assert (resolved["c"].cron.expression, resolved["c"].catch_up) == ("@daily", 2)


def test_a_setting_entry_for_an_unknown_kind_is_an_error() -> None:
    registry = HandlerRegistry()
    with pytest.raises(ScheduleError, match="names kind 'nope', but no handler is registered"):
        resolve_schedules(registry, parse_schedules("nope=* * * * *"))
    assert resolve_schedules(registry, parse_schedules("nope=* * * * *"), strict=False) == []


def test_a_schedule_that_is_not_a_valid_task_is_an_error() -> None:
    registry = HandlerRegistry()

    @handler("x", registry=registry, cron="* * * * *", priority=11)
    async def x(ctx: JobContext) -> None:
        return None

    with pytest.raises(ScheduleError, match="schedule of 'x': invalid priority: 11"):
        resolve_schedules(registry)


def test_schedules_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNC_PROCESSOR_SCHEDULES", " report = 0  3 * * * ;sync=*/5 * * * *;x=OFF;")
    monkeypatch.setenv("ASYNC_PROCESSOR_SCHEDULE_CATCH_UP", "4")
    s = load_settings()
    assert s.schedules == (("report", "0 3 * * *"), ("sync", "*/5 * * * *"), ("x", "off"))
    assert s.schedule_catch_up == 4
    assert Settings.model_fields["schedules"].default == ()
    assert Settings.model_fields["schedule_catch_up"].default == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("report=61 * * * *", "kind 'report': '61 * * * *' is not a valid cron expression"),
        ("report", "'report' is not KIND=CRON"),
        ("a=* * * * *;a=@daily", "kind 'a' is listed twice"),
        ("=* * * * *", "is not KIND=CRON"),
    ],
)
def test_bad_schedules_setting_names_the_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("ASYNC_PROCESSOR_SCHEDULES", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert f"ASYNC_PROCESSOR_SCHEDULES={value!r}" in str(info.value)
    assert message in str(info.value)


def test_bad_catch_up_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYNC_PROCESSOR_SCHEDULE_CATCH_UP", "0")
    with pytest.raises(SettingsError, match="ASYNC_PROCESSOR_SCHEDULE_CATCH_UP='0'"):
        load_settings()
