"""Read-only aggregates for the CLI status, /status and /metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    Executable,
    Float,
    Integer,
    Select,
    String,
    case,
    func,
    literal,
    select,
    text,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import DEFAULT_LEASE_SECONDS
from app.db import Database, later_sql, now_sql
from app.models import PendingAnalysis, Processor, ProcessorState, TaskStatus
from app.models.async_task import FINISHED_STATUSES, FINISHED_WHERE
from app.services import queue, schedules
from app.services.handlers import Schedule
from app.services.readable import as_text
from app.text import error_line

logger = logging.getLogger("app.stats")
T = PendingAnalysis
STATUS_ORDER = tuple(s.value for s in TaskStatus)
FINISHED = frozenset(s.value for s in FINISHED_STATUSES)


async def summary(
    db: Database,
    *,
    user_id: str | None = None,
    project_id: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
) -> dict[str, Any]:
    """Counts per queue and status, the oldest pending task's age, durations of the last
    hour, and the daemons; scoped to a user and/or a project when given.

    ``processors`` are the live daemons; ``silent_processors`` those not stopped but silent
    for ``queue.DEAD_PROCESSOR_LEASES`` leases (their process died; a running daemon's
    rescuer marks them stopped, but when none runs they would otherwise show live for
    ever). The counts come from ``task_counts``."""
    counts = await task_counts(db, user_id=user_id, project_id=project_id)
    async with db.read_transaction() as session:
        # A paused queue's tasks wait on purpose: they would trip every alert on this age.
        paused = queue.PAUSED_QUEUES
        oldest = select(func.min(_due_since())).where(
            T.status == TaskStatus.PENDING,
            T.scheduled_at <= now_sql(db.dialect),
            T.queue.not_in(paused),
        )
        durations = select(
            func.count(T.duration_seconds),
            func.avg(T.duration_seconds),
            func.max(T.duration_seconds),
        ).where(T.status == TaskStatus.COMPLETED, T.completed_at >= later_sql(db.dialect, -3600))
        for column, value in ((T.user_id, user_id), (T.project_id, project_id)):
            if value is not None:
                oldest = oldest.where(column == value)
                durations = durations.where(column == value)
        n_done, avg_done, max_done = (await session.execute(durations)).one()
        queues: dict[str, dict[str, int]] = {}
        for (status, name, _kind), n in sorted(counts.items()):
            per_queue = queues.setdefault(name, {})
            per_queue[status] = per_queue.get(status, 0) + n
        first = (await session.execute(oldest)).scalar_one_or_none()
        now = (await session.execute(select(now_sql(db.dialect)))).scalar_one()
        silent = queue.processor_silent(db.dialect, queue.DEAD_PROCESSOR_LEASES * lease_seconds)
        procs = (
            await session.execute(
                select(Processor, silent.label("silent"))
                .where(Processor.state != ProcessorState.STOPPED)
                .order_by(Processor.started_at, Processor.id)
            )
        ).all()
        switches = await queue.queue_switches(session)
    totals = {s: sum(q.get(s, 0) for q in queues.values()) for s in STATUS_ORDER}
    return {
        "counts": totals,
        "queues": queues,
        "oldest_pending_age_seconds": (now - first).total_seconds() if first else None,
        "last_hour": {
            "completed": n_done,
            "avg_duration_seconds": float(avg_done) if avg_done is not None else None,
            "max_duration_seconds": float(max_done) if max_done is not None else None,
        },
        "paused_queues": sorted(name for name, switch in switches.items() if switch.paused),
        "processors": [_processor(p, now) for p, is_silent in procs if not is_silent],
        "silent_processors": [_processor(p, now) for p, is_silent in procs if is_silent],
    }


def _processor(p: Processor, now: datetime) -> dict[str, Any]:
    return {
        "id": p.id,
        "hostname": p.hostname,
        "pid": p.pid,
        "state": p.state,
        "concurrency": p.concurrency,
        "queues": p.queues,  # what it serves ("*": all; "ingest=2,default": QUEUES)
        "in_flight": p.in_flight,
        "processed": p.processed,
        "failed": p.failed,
        "last_seen_at": p.last_seen_at.isoformat(),
        "silent_seconds": round(max(0.0, (now - p.last_seen_at).total_seconds()), 1),
    }


RECENT_WINDOW_SECONDS = 3600


async def by_kind(db: Database) -> dict[str, dict[str, int]]:
    """Task counts per kind and status (over the retained history), from ``task_counts``."""
    result: dict[str, dict[str, int]] = {}
    for (status, _queue, kind), n in sorted((await task_counts(db, with_kind=True)).items()):
        per_kind = result.setdefault(kind, {})
        per_kind[status] = per_kind.get(status, 0) + n
    return result


#: (status, queue, kind) → tasks.
Counts = Counter[tuple[str, str, str]]
_PENDING = text(f"status = '{TaskStatus.PENDING.value}'")
_PROCESSING = text(f"status = '{TaskStatus.PROCESSING.value}'")
_FINISHED = text(FINISHED_WHERE)

# Finished tasks are most of the table and their counts barely change, but counting them on
# every poll grew with the history (a GROUP BY over a million rows took a second on SQLite). So
# each (database, scope) keeps a *base*: the finished tasks except those that finished after a
# cut-off (REFRESH_MARGIN_SECONDS before the database clock when the base was taken), in one
# statement: every finished task, counted from the finished index alone, minus those past the
# cut-off, a short range of the completed_at index. Every call then adds, in one statement,
# the pending and the processing tasks (through their partial indexes) and the tasks finished
# after the cut-off: new completions count at once. What a base can miss until it is retaken
# (BASE_MAX_AGE_SECONDS later at most, or sooner once more than RECENT_ROWS_REFRESH tasks
# finished after its cut-off): a task that finished before the cut-off and was since retried
# or pruned by another process, and a finish committed more than the margin after its
# completed_at. A retry through this process retakes it at once (``forget``); each of
# ``api --workers N``'s processes keeps its own bases.
BASE_MAX_AGE_SECONDS = 30.0
REFRESH_MARGIN_SECONDS = 30.0
RECENT_ROWS_REFRESH = 5_000
SCOPES_KEPT = 256


@dataclass(slots=True)
class _Base:
    counts: Counts
    cutoff: datetime
    taken: float  # time.monotonic()
    retaking: asyncio.Task[None] | None = None


Scope = tuple[str | None, str | None]
_BASES: WeakKeyDictionary[Database, dict[Scope, _Base]] = WeakKeyDictionary()


def forget(db: Database) -> None:
    """Drop the bases of ``task_counts`` (the next call retakes them, and a retake under way
    is discarded): call it after changing tasks that had finished, such as a retry."""
    _BASES.pop(db, None)


def _scope(user_id: str | None, project_id: str | None) -> list[ColumnElement[bool]]:
    return [
        column == value
        for column, value in ((T.user_id, user_id), (T.project_id, project_id))
        if value is not None
    ]


def _finished_after(cutoff: datetime, scope: list[ColumnElement[bool]]) -> Select[str, str, str]:
    # The statuses are bound parameters, not FINISHED_WHERE, on purpose: the finished index
    # is then out of the running and the planner reads the completed_at range (SQLite would
    # rather walk the finished index for its GROUP BY order, looking every row up).
    return select(T.status, T.queue, T.kind).where(
        T.status.in_(sorted(FINISHED)), T.completed_at > cutoff, *scope
    )


def finished_before(
    cutoff: datetime, *, user_id: str | None = None, project_id: str | None = None
) -> CompoundSelect[Any]:
    """A base, as rows to add up per (status, queue, kind): every finished task (read from
    the finished index alone), and minus those that finished after ``cutoff``."""
    scope = _scope(user_id, project_id)
    columns = (T.status, T.queue, T.kind)
    every = select(*columns, func.count()).where(_FINISHED, *scope).group_by(*columns)
    after = _finished_after(cutoff, scope).subquery()
    minus = select(after.c.status, after.c.queue, after.c.kind, -func.count()).group_by(
        after.c.status, after.c.queue, after.c.kind
    )
    return union_all(every, minus)


def live_counts(
    cutoff: datetime,
    *,
    user_id: str | None = None,
    project_id: str | None = None,
    with_kind: bool = False,
) -> CompoundSelect[Any]:
    """Pending and processing tasks per (status, queue, kind), each status read through its
    partial index, and the tasks finished after ``cutoff``, in one statement (one snapshot).
    Without ``with_kind``, kinds are ``""`` and the claim index holds all a pending count
    needs (PostgreSQL reads it alone)."""
    scope = _scope(user_id, project_id)
    kind = T.kind if with_kind else literal("", String())
    parts: list[Select[str, str, str, int]] = [
        select(literal(status.value, String()), T.queue, kind, func.count())
        .where(predicate, *scope)
        .group_by(T.queue, kind)
        for status, predicate in (
            (TaskStatus.PENDING, _PENDING),
            (TaskStatus.PROCESSING, _PROCESSING),
        )
    ]
    after = _finished_after(cutoff, scope).subquery()
    parts.append(
        select(after.c.status, after.c.queue, after.c.kind, func.count()).group_by(
            after.c.status, after.c.queue, after.c.kind
        )
    )
    return union_all(*parts)


async def _count(session: AsyncSession, stmt: Executable) -> Counts:
    counts: Counts = Counter()
    for status, name, kind, n in (await session.execute(stmt)).all():
        counts[(as_text(status), as_text(name), as_text(kind))] += n
    return counts


async def _take_base(db: Database, scope: Scope) -> _Base:
    async with db.read_transaction() as session:
        now = (await session.execute(select(now_sql(db.dialect)))).scalar_one()
        cutoff = now - timedelta(seconds=REFRESH_MARGIN_SECONDS)
        user_id, project_id = scope
        counts = await _count(
            session, finished_before(cutoff, user_id=user_id, project_id=project_id)
        )
    return _Base(counts, cutoff, time.monotonic())


def _keep(db: Database, scope: Scope, base: _Base) -> None:
    bases = _BASES.setdefault(db, {})
    bases[scope] = base
    if len(bases) > SCOPES_KEPT:
        del bases[min(bases, key=lambda key: bases[key].taken)]


async def _retake(db: Database, scope: Scope, old: _Base) -> None:
    try:
        new = await _take_base(db, scope)
    except Exception as exc:  # the old base serves on; a later call retries
        logger.warning("could not recount the finished tasks (%s)", error_line(exc))
        old.retaking = None
        return
    if _BASES.get(db, {}).get(scope) is old:  # not forgotten meanwhile
        _keep(db, scope, new)


async def task_counts(
    db: Database,
    *,
    user_id: str | None = None,
    project_id: str | None = None,
    with_kind: bool = False,
) -> Counts:
    """Tasks per (status, queue, kind) in a scope, without reading the whole history: the
    finished ones up to a cut-off from a base, the rest live (see above). A base that is
    old is retaken in the background while it keeps serving."""
    scope = (user_id, project_id)
    base = _BASES.get(db, {}).get(scope)
    if base is None:
        base = await _take_base(db, scope)
        _keep(db, scope, base)
    async with db.read_transaction() as session:
        live = await _count(
            session,
            live_counts(base.cutoff, user_id=user_id, project_id=project_id, with_kind=with_kind),
        )
    finished_after = sum(n for (status, _, _), n in live.items() if status in FINISHED)
    old = time.monotonic() - base.taken > BASE_MAX_AGE_SECONDS
    if (old or finished_after > RECENT_ROWS_REFRESH) and base.retaking is None:
        base.retaking = asyncio.create_task(_retake(db, scope, base))
    return base.counts + live


def _due_since() -> Any:
    """When a task became due: its scheduled_at, or its created_at when that is later (a
    schedule given in the past: the task could not wait before it existed, and an old
    date would make the pick-up delay and the oldest pending age read years)."""
    return case((T.created_at > T.scheduled_at, T.created_at), else_=T.scheduled_at)


@dataclass(frozen=True)
class KindTimings:
    """One kind's jobs completed in the last hour: how many, and for their run time and
    their pick-up delay the sum and the count at or under each bound (cumulative)."""

    count: int
    duration_sum: float
    duration_buckets: tuple[int, ...]
    pickup_sum: float
    pickup_buckets: tuple[int, ...]


def _epoch_seconds(dialect: str, column: Any) -> Any:
    """A timestamp column as seconds, exact to the microsecond, for differences."""
    if dialect == "postgresql":
        return func.extract("epoch", column)
    # SQLite keeps naive UTC text with six fractional digits; julianday() reads only three of
    # them, and a pick-up delay is a millisecond or two. Whole seconds, then the fraction.
    whole = func.cast(func.strftime("%s", func.substr(column, 1, 19)), Integer)
    return whole + func.cast(func.substr(column, 20), Float)


async def recent_histograms(
    db: Database, duration_bounds: Sequence[float], pickup_bounds: Sequence[float]
) -> dict[str, KindTimings]:
    """Per kind, the run time and pick-up delay of every job completed in the last hour,
    counted in the database (GROUP BY kind): no row leaves it, and a busy kind cannot crowd
    the others out. Pick-up is started_at less when the task became due (``_due_since``)."""
    duration = func.coalesce(T.duration_seconds, 0.0)
    waited = _epoch_seconds(db.dialect, T.started_at) - _epoch_seconds(db.dialect, _due_since())
    pickup = case((waited > 0, waited), else_=0.0)

    def under(value: Any, bound: float) -> Any:
        return func.sum(case((value <= bound, 1), else_=0))

    # Grouped by the kind itself, SQLite walks the whole table through the kind index (rows
    # come grouped, no sort) instead of the last hour's range of the completed_at index.
    kind: Any = T.kind.concat("") if db.dialect == "sqlite" else T.kind
    stmt = (
        select(
            kind,
            func.count(),
            func.sum(duration),
            func.sum(pickup),
            *(under(duration, b) for b in duration_bounds),
            *(under(pickup, b) for b in pickup_bounds),
        )
        .where(
            T.status == TaskStatus.COMPLETED,
            T.completed_at >= later_sql(db.dialect, -RECENT_WINDOW_SECONDS),
            T.started_at.is_not(None),
        )
        .group_by(kind)
        .order_by(kind)
    )
    async with db.read_transaction() as session:
        rows = (await session.execute(stmt)).all()
    split = 4 + len(duration_bounds)
    return {
        row[0]: KindTimings(
            count=int(row[1]),
            duration_sum=float(row[2] or 0.0),
            pickup_sum=float(row[3] or 0.0),
            duration_buckets=tuple(int(n or 0) for n in row[4:split]),
            pickup_buckets=tuple(int(n or 0) for n in row[split:]),
        )
        for row in rows
    }


TIMELINE_MINUTES = 60


async def timeline(
    db: Database, *, minutes: int = TIMELINE_MINUTES, project_id: str | None = None
) -> list[dict[str, Any]]:
    """Completed and failed tasks per minute over the last ``minutes``, oldest first (of one
    project's tasks, when given)."""
    if db.dialect == "postgresql":
        minute: Any = func.to_char(
            func.date_trunc("minute", func.timezone("UTC", T.completed_at)), "YYYY-MM-DD HH24:MI"
        )
    else:
        minute = func.substr(T.completed_at, 1, 16)
    stmt = (
        select(minute.label("minute"), T.status, func.count())
        .where(
            T.status.in_([TaskStatus.COMPLETED, TaskStatus.FAILED]),
            T.completed_at >= later_sql(db.dialect, -60 * minutes),
        )
        .group_by(minute, T.status)
        .order_by(minute)
    )
    if project_id is not None:
        stmt = stmt.where(T.project_id == project_id)
    async with db.read_transaction() as session:
        rows = (await session.execute(stmt)).all()
    per_minute: dict[str, dict[str, Any]] = {}
    for at, status, n in rows:
        entry = per_minute.setdefault(at, {"minute": at, "completed": 0, "failed": 0})
        entry[status] = n
    return list(per_minute.values())


async def schedule_overview(db: Database, periodic: Sequence[Schedule]) -> list[dict[str, Any]]:
    """Each periodic schedule: its cron, next tick, and the last tick and task it enqueued."""
    if not periodic:
        return []
    async with db.read_transaction() as session:
        return await schedules.overview(session, periodic)
