"""Read-only aggregates for the CLI status, /status and /metrics."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from app.db import Database, later_sql, now_sql
from app.models import PendingAnalysis, Processor, ProcessorState, TaskStatus

T = PendingAnalysis
STATUS_ORDER = tuple(s.value for s in TaskStatus)


async def summary(
    db: Database, *, user_id: str | None = None, project_id: str | None = None
) -> dict[str, Any]:
    """Counts per queue and status, the oldest pending task's age, durations of the last
    hour, and the live daemons; scoped to a user and/or a project when given."""
    async with db.read_transaction() as session:
        counts = select(T.queue, T.status, func.count()).group_by(T.queue, T.status)
        oldest = select(func.min(T.scheduled_at)).where(
            T.status == TaskStatus.PENDING, T.scheduled_at <= now_sql(db.dialect)
        )
        durations = select(
            func.count(T.duration_seconds),
            func.avg(T.duration_seconds),
            func.max(T.duration_seconds),
        ).where(T.status == TaskStatus.COMPLETED, T.completed_at >= later_sql(db.dialect, -3600))
        for column, value in ((T.user_id, user_id), (T.project_id, project_id)):
            if value is not None:
                counts = counts.where(column == value)
                oldest = oldest.where(column == value)
                durations = durations.where(column == value)
        n_done, avg_done, max_done = (await session.execute(durations)).one()
        queues: dict[str, dict[str, int]] = {}
        for name, status, n in (await session.execute(counts)).all():
            queues.setdefault(name, {})[status] = n
        first = (await session.execute(oldest)).scalar_one_or_none()
        now = (await session.execute(select(now_sql(db.dialect)))).scalar_one()
        procs = (
            await session.scalars(
                select(Processor).where(Processor.state != ProcessorState.STOPPED)
            )
        ).all()
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
        "processors": [
            {
                "id": p.id,
                "hostname": p.hostname,
                "pid": p.pid,
                "state": p.state,
                "concurrency": p.concurrency,
                "in_flight": p.in_flight,
                "processed": p.processed,
                "failed": p.failed,
                "last_seen_at": p.last_seen_at.isoformat(),
            }
            for p in procs
        ],
    }


RECENT_WINDOW_SECONDS = 3600
RECENT_ROWS_MAX = 10_000


async def by_kind(db: Database) -> dict[str, dict[str, int]]:
    """Task counts per kind and status (over the retained history)."""
    async with db.read_transaction() as session:
        rows = await session.execute(
            select(T.kind, T.status, func.count()).group_by(T.kind, T.status)
        )
        result: dict[str, dict[str, int]] = {}
        for kind, status, n in rows.all():
            result.setdefault(kind, {})[status] = n
    return result


async def recent_timings(db: Database) -> list[tuple[str, float, float]]:
    """(kind, duration, pick-up delay) of jobs completed in the last hour, newest first,
    at most RECENT_ROWS_MAX of them. Pick-up is started_at - scheduled_at."""
    async with db.read_transaction() as session:
        rows = await session.execute(
            select(T.kind, T.duration_seconds, T.started_at, T.scheduled_at)
            .where(
                T.status == TaskStatus.COMPLETED,
                T.completed_at >= later_sql(db.dialect, -RECENT_WINDOW_SECONDS),
            )
            .order_by(T.completed_at.desc())
            .limit(RECENT_ROWS_MAX)
        )
        return [
            (kind, duration or 0.0, max(0.0, (started - scheduled).total_seconds()))
            for kind, duration, started, scheduled in rows.all()
            if started is not None
        ]


TIMELINE_MINUTES = 60


async def timeline(db: Database, *, minutes: int = TIMELINE_MINUTES) -> list[dict[str, Any]]:
    """Completed and failed tasks per minute over the last ``minutes``, oldest first."""
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
    async with db.read_transaction() as session:
        rows = (await session.execute(stmt)).all()
    per_minute: dict[str, dict[str, Any]] = {}
    for at, status, n in rows:
        entry = per_minute.setdefault(at, {"minute": at, "completed": 0, "failed": 0})
        entry[status] = n
    return list(per_minute.values())
