"""Periodic schedules: which ones exist (code and settings), their state shared by every
daemon (the ``schedules`` table), and the statements that enqueue each tick once.

A tick is enqueued as a task whose idempotency key is ``cron:<kind>:<tick, ISO UTC>``, in
the transaction that advances the schedule's row (locked), so with any number of daemons
one tick is one task. A new schedule starts at its next tick. After downtime, the ticks
missed since the row's ``last_tick`` are enqueued, the latest ``catch_up`` of them only.

Like ``queue``: every function takes the caller's session first and never commits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy import Table, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import SCHEDULE_OFF, ScheduleSpec, Settings
from app.cron import Cron
from app.db import dialect_of, now_sql
from app.models import PendingAnalysis as T
from app.models import ScheduleState
from app.services import queue
from app.services.handlers import HandlerRegistry, Schedule, ScheduleError
from app.services.queue import InvalidTaskError, TaskSpec

SCHEDULES: Table = ScheduleState.__table__  # type: ignore[assignment]
S = SCHEDULES.c
KEY_PREFIX = "cron"
logger = logging.getLogger("app.scheduler")


#: What an enqueue from a user (the API, the CLI) is told when its key could be a tick's.
RESERVED_KEY_RULE = (
    f"idempotency keys starting with '{KEY_PREFIX}:' are reserved for periodic schedules"
)


def is_tick_key(key: str) -> bool:
    """Whether ``key`` is in the schedules' namespace: a user's task holding a tick's key
    would stand in for that tick, and the scheduled task would never be enqueued."""
    return key.startswith(f"{KEY_PREFIX}:")


def tick_key(kind: str, tick: datetime) -> str:
    """The idempotency key of ``kind``'s task for ``tick``: ``cron:<kind>:<ISO UTC>``."""
    return f"{KEY_PREFIX}:{kind}:{tick.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def resolve_schedules(
    registry: HandlerRegistry,
    overrides: ScheduleSpec = (),
    *,
    default_catch_up: int = 1,
    default_max_retries: int = queue.DEFAULT_MAX_RETRIES,
    default_timeout: int = queue.DEFAULT_TIMEOUT_SECONDS,
    strict: bool = True,
) -> list[Schedule]:
    """The schedules this process runs: the ones declared in code, with the
    ASYNC_PROCESSOR_SCHEDULES entries applied (a new schedule for a registered kind, a
    new cron for a declared one, or ``off``); ``catch_up``, ``max_retries`` and
    ``timeout_seconds`` filled from the settings where the schedule leaves them None.

    Raises ScheduleError when an entry names a kind no handler module registers, or a
    schedule's payload, priority or queue is not a valid task; with ``strict`` False (the
    API and the CLI, which only show schedules) such schedules are left out instead."""
    by_kind = {s.kind: s for s in registry.schedules()}
    for kind, expression in overrides:
        if kind not in registry:
            if not strict:
                continue
            raise ScheduleError(
                f"ASYNC_PROCESSOR_SCHEDULES names kind {kind!r}, but no handler is "
                f"registered for it (registered: {', '.join(registry.kinds()) or 'none'})"
            )
        if expression == SCHEDULE_OFF:
            by_kind.pop(kind, None)
            continue
        cron = Cron.parse(expression)
        declared = by_kind.get(kind)
        by_kind[kind] = (
            dataclasses.replace(declared, cron=cron) if declared else Schedule(kind, cron)
        )
    resolved = []
    for kind in sorted(by_kind):
        schedule = by_kind[kind]
        schedule = dataclasses.replace(
            schedule,
            catch_up=default_catch_up if schedule.catch_up is None else schedule.catch_up,
            max_retries=(
                default_max_retries if schedule.max_retries is None else schedule.max_retries
            ),
            timeout_seconds=(
                default_timeout if schedule.timeout_seconds is None else schedule.timeout_seconds
            ),
        )
        try:
            task_spec(schedule, datetime(2000, 1, 1))
        except InvalidTaskError as exc:
            if not strict:
                continue
            raise ScheduleError(f"schedule of {kind!r}: {exc}") from None
        resolved.append(schedule)
    return resolved


def shown_schedules(registry: HandlerRegistry, settings: Settings) -> list[Schedule]:
    """The schedules the daemons run with these settings, for status pages (lenient)."""
    return resolve_schedules(
        registry, settings.schedules, **schedule_defaults(settings), strict=False
    )


class ScheduleDefaults(TypedDict):
    """resolve_schedules' defaults: what a schedule leaves None."""

    default_catch_up: int
    default_max_retries: int
    default_timeout: int


def schedule_defaults(settings: Settings) -> ScheduleDefaults:
    """What a schedule leaves None, from the settings (resolve_schedules' defaults)."""
    return {
        "default_catch_up": settings.schedule_catch_up,
        "default_max_retries": settings.max_retries,
        "default_timeout": settings.processing_timeout,
    }


def task_spec(schedule: Schedule, tick: datetime) -> TaskSpec:
    """The task one tick of ``schedule`` enqueues (scheduled at the tick itself)."""
    return TaskSpec(
        kind=schedule.kind,
        payload=dict(schedule.payload),
        priority=queue.DEFAULT_PRIORITY if schedule.priority is None else schedule.priority,
        queue=schedule.queue or queue.DEFAULT_QUEUE,
        max_retries=(
            queue.DEFAULT_MAX_RETRIES if schedule.max_retries is None else schedule.max_retries
        ),
        timeout_seconds=(
            queue.DEFAULT_TIMEOUT_SECONDS
            if schedule.timeout_seconds is None
            else schedule.timeout_seconds
        ),
        scheduled_at=tick,
        idempotency_key=tick_key(schedule.kind, tick),
    )


@dataclass(frozen=True, slots=True)
class TickPlan:
    """What one schedule does now: the ticks to enqueue (oldest first), the new last tick."""

    ticks: tuple[datetime, ...]
    last_tick: datetime


def plan_ticks(
    cron: Cron,
    *,
    now: datetime,
    last_tick: datetime | None,
    catch_up: int,
    cron_changed: bool = False,
    change_grace: float = 30.0,
) -> TickPlan:
    """The tick rule, as a pure function.

    - A schedule seen for the first time (``last_tick`` None) starts now: no task, its
      first one is at its next tick.
    - Otherwise the ticks in (``last_tick``, ``now``] are due; the latest ``catch_up`` of
      them are enqueued (one, by default: a daemon back from downtime does not flood).
    - A changed cron expression counts only its ticks of the last ``change_grace`` seconds
      (a tick just due), never ones from before the change.
    """
    latest = cron.latest_at_or_before(now)
    if last_tick is None:
        return TickPlan((), latest or now)
    since = last_tick
    if cron_changed:  # the tick just due, if any: catch_up is for downtime, not a change
        since = max(last_tick, now - timedelta(seconds=change_grace))
        catch_up = 1
    ticks = cron.ticks_between(since, now, limit=catch_up)
    if not ticks:
        return TickPlan((), max(last_tick, latest) if latest and cron_changed else last_tick)
    return TickPlan(tuple(reversed(ticks)), ticks[0])


@dataclass(frozen=True, slots=True)
class TickEnqueued:
    """One tick's task: ``created`` False when its key already existed."""

    kind: str
    tick: datetime
    task_id: int
    created: bool


@dataclass(frozen=True, slots=True)
class ScheduleRun:
    """One pass over some schedules: the database's clock, the ticks enqueued, and each
    schedule's last tick afterwards."""

    now: datetime
    enqueued: tuple[TickEnqueued, ...]
    last_ticks: dict[str, datetime]


async def enqueue_due(
    session: AsyncSession,
    schedules: Sequence[Schedule],
    *,
    now: datetime | None = None,
    change_grace: float = 30.0,
) -> ScheduleRun:
    """Lock the rows of ``schedules`` (creating missing ones), enqueue their due ticks and
    advance the rows, in the caller's transaction. ``now`` pins the clock (tests);
    otherwise the database's clock is used, so daemons on hosts whose clocks differ agree."""
    dialect = dialect_of(session)
    current: datetime = (await session.execute(select(now_sql(dialect, now)))).scalar_one()
    by_kind = {s.kind: s for s in schedules}
    kinds = sorted(by_kind)
    rows = await _lock(session, kinds)
    missing = [k for k in kinds if k not in rows]
    if missing:
        await _create(session, [by_kind[k] for k in missing], current, dialect)
        rows = await _lock(session, kinds)
    enqueued: list[TickEnqueued] = []
    last_ticks: dict[str, datetime] = {}
    for kind in kinds:
        schedule, row = by_kind[kind], rows[kind]
        plan = plan_ticks(
            schedule.cron,
            now=current,
            last_tick=None if kind in missing else row.last_tick,
            catch_up=schedule.catch_up or 1,
            cron_changed=row.cron != schedule.cron.expression,
            change_grace=change_grace,
        )
        last_ticks[kind] = plan.last_tick
        if kind in missing:
            continue
        values: dict[str, Any] = {"cron": schedule.cron.expression, "last_tick": plan.last_tick}
        if plan.ticks:
            # created_at is the real clock even when ``now`` is pinned.
            results = await queue.enqueue_tasks(
                session, [task_spec(schedule, t) for t in plan.ticks]
            )
            ticks = [
                TickEnqueued(kind, t, r.id, r.created)
                for t, r in zip(plan.ticks, results, strict=True)
            ]
            await _warn_of_foreign_holders(session, kind, [t for t in ticks if not t.created])
            enqueued += ticks
            values.update(
                last_task_id=ticks[-1].task_id,
                last_enqueued_at=current,
                enqueued_total=S.enqueued_total + sum(t.created for t in ticks),
            )
        if plan.ticks or values["cron"] != row.cron or plan.last_tick != row.last_tick:
            await session.execute(
                update(SCHEDULES).where(S.kind == kind).values(**values, updated_at=current)
            )
    return ScheduleRun(current, tuple(enqueued), last_ticks)


async def _warn_of_foreign_holders(
    session: AsyncSession, kind: str, taken: list[TickEnqueued]
) -> None:
    """A tick whose key a task of another kind holds was not run: say so (keys in the
    schedules' namespace are refused from users, but the library and SQL can still write
    one)."""
    if not taken:
        return
    rows = await session.execute(
        select(T.id, T.kind).where(T.id.in_([t.task_id for t in taken]), T.kind != kind)
    )
    for task_id, other in rows.all():
        logger.warning(
            "schedule %s: a tick's key is held by task %s of kind %r; that tick does not run",
            kind,
            task_id,
            other,
            extra={"action": "tick_key_taken", "kind": kind, "task_id": task_id},
        )


async def _lock(session: AsyncSession, kinds: list[str]) -> dict[str, Any]:
    stmt = select(SCHEDULES).where(S.kind.in_(kinds)).order_by(S.kind).with_for_update()
    return {row.kind: row for row in (await session.execute(stmt)).all()}


async def _create(
    session: AsyncSession, schedules: Iterable[Schedule], now: datetime, dialect: str
) -> None:
    rows = [
        {
            "kind": s.kind,
            "cron": s.cron.expression,
            "last_tick": plan_ticks(s.cron, now=now, last_tick=None, catch_up=1).last_tick,
            "enqueued_total": 0,
            "updated_at": now,
        }
        for s in schedules
    ]
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(SCHEDULES).on_conflict_do_nothing(index_elements=[S.kind])
    elif dialect == "sqlite":
        stmt = sqlite.insert(SCHEDULES).on_conflict_do_nothing(index_elements=[S.kind])
    else:  # pragma: no cover - the two supported engines are above
        stmt = insert(SCHEDULES)
    await session.execute(stmt, rows)


async def overview(
    session: AsyncSession, schedules: Sequence[Schedule], *, now: datetime | None = None
) -> list[dict[str, Any]]:
    """For status pages: each schedule with its next tick and what it last enqueued (the
    task's id, time and current status; the task may have been pruned since)."""
    current: datetime = (
        await session.execute(select(now_sql(dialect_of(session), now)))
    ).scalar_one()
    kinds = [s.kind for s in schedules]
    stmt = select(SCHEDULES).where(S.kind.in_(kinds))
    rows = {r.kind: r for r in (await session.execute(stmt)).all()}
    listed = []
    for s in schedules:
        row = rows.get(s.kind)
        next_tick = s.cron.next_after(current)
        last = None
        if row is not None and row.last_task_id is not None:
            last = await queue.get_task(session, row.last_task_id)
        listed.append(
            {
                "kind": s.kind,
                "cron": s.cron.expression,
                "description": s.cron.describe(),
                "queue": s.queue or queue.DEFAULT_QUEUE,
                "catch_up": s.catch_up,
                "next_tick": next_tick.isoformat() if next_tick else None,
                "last_tick": row.last_tick.isoformat() if row else None,
                "last_task_id": row.last_task_id if row else None,
                "last_enqueued_at": (
                    row.last_enqueued_at.isoformat() if row and row.last_enqueued_at else None
                ),
                "last_status": last.status if last else None,
                "enqueued_total": row.enqueued_total if row else 0,
            }
        )
    return listed
