"""Every statement of the job life cycle, written once for SQLite and PostgreSQL.

Rules: each function takes the caller's session first and never commits, so a state
change and its notification share one commit. Every write a daemon makes about a job it
runs is fenced on (id, locked_by, attempts) and reports whether it applied: a daemon whose
lease expired and whose job was rescued and re-run can never overwrite the new run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    bindparam,
    case,
    delete,
    false,
    func,
    insert,
    literal_column,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import dialect_of, later_sql, now_sql
from app.models import (
    FINISHED_STATUSES,
    NotificationType,
    PendingAnalysis,
    Processor,
    ProcessorState,
    TaskStatus,
)
from app.models.types import UTCDateTime
from app.services import notifications
from app.services.notifications import TaskRef

T = PendingAnalysis
NOTIFY_CHANNEL = "async_processor_tasks"
DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY = 5
MIN_PRIORITY, MAX_PRIORITY = 1, 10
DEFAULT_MAX_RETRIES = 3
DEFAULT_TIMEOUT_SECONDS = 600
MAX_NAME_LENGTH = 100
MAX_ID_LENGTH = 255
PRUNE_BATCH_SIZE = 1_000
LEASE_EXPIRED_ERROR = (
    "lease expired: the daemon running this attempt stopped renewing it "
    "(it died, hung or lost the database)"
)

_PENDING_LITERAL: ColumnElement[str] = literal_column(f"'{TaskStatus.PENDING.value}'", String())
REF_COLUMNS = (T.id, T.kind, T.user_id, T.project_id, T.chapter_id, T.attempts)


class InvalidTaskError(ValueError):
    """A task spec that can never be valid (bad priority, timeout, names …)."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What to enqueue. Validated on construction."""

    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    priority: int = DEFAULT_PRIORITY
    queue: str = DEFAULT_QUEUE
    max_retries: int = DEFAULT_MAX_RETRIES
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS
    scheduled_at: datetime | None = None
    user_id: str | None = None
    project_id: str | None = None
    chapter_id: str | None = None
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        _check(bool(self.kind) and len(self.kind) <= MAX_NAME_LENGTH, "kind", self.kind)
        _check(bool(self.queue) and len(self.queue) <= MAX_NAME_LENGTH, "queue", self.queue)
        _check(isinstance(self.payload, dict), "payload", "must be a JSON object")
        _check(MIN_PRIORITY <= self.priority <= MAX_PRIORITY, "priority", self.priority)
        _check(self.max_retries >= 0, "max_retries", self.max_retries)
        _check(self.timeout_seconds > 0, "timeout_seconds", self.timeout_seconds)
        for name in ("user_id", "project_id", "chapter_id", "idempotency_key"):
            value = getattr(self, name)
            _check(value is None or 0 < len(value) <= MAX_ID_LENGTH, name, value)
        try:
            text = json.dumps(self.payload, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidTaskError(f"payload is not JSON-serialisable: {exc}") from None
        # PostgreSQL stores neither NUL characters in text nor \u0000 in jsonb.
        strings = [self.kind, self.queue, self.user_id, self.project_id, self.chapter_id]
        if "\\u0000" in text or any("\x00" in s for s in [*strings, self.idempotency_key] if s):
            raise InvalidTaskError("strings must not contain NUL (\\u0000) characters")

    def row(self) -> dict[str, Any]:
        """Insert parameters for this spec (``sched`` feeds the scheduled_at default)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["sched"] = values.pop("scheduled_at")
        return values


def _check(ok: bool, name: str, value: object) -> None:
    if not ok:
        raise InvalidTaskError(f"invalid {name}: {value!r}")


@dataclass(frozen=True, slots=True)
class EnqueuedTask:
    """An enqueue's answer: the task id, and False when an idempotency key matched."""

    id: int
    created: bool


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A job this daemon now holds, as plain data (never an ORM row)."""

    id: int
    kind: str
    queue: str
    payload: dict[str, Any]
    priority: int
    attempt: int
    retry_count: int
    max_retries: int
    timeout_seconds: int
    user_id: str | None
    project_id: str | None
    chapter_id: str | None
    scheduled_at: datetime
    created_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> ClaimedTask:
        """Build from a claim's RETURNING row."""
        return cls(
            id=row.id,
            kind=row.kind,
            queue=row.queue,
            payload=row.payload,
            priority=row.priority,
            attempt=row.attempts,
            retry_count=row.retry_count,
            max_retries=row.max_retries,
            timeout_seconds=row.timeout_seconds,
            user_id=row.user_id,
            project_id=row.project_id,
            chapter_id=row.chapter_id,
            scheduled_at=row.scheduled_at,
            created_at=row.created_at,
        )

    @property
    def ref(self) -> TaskRef:
        """The notification view of this task."""
        return TaskRef(
            self.id, self.kind, self.user_id, self.project_id, self.chapter_id, self.attempt
        )


class FailOutcome(StrEnum):
    """What a failure did to the job."""

    RETRYING = "retrying"
    FAILED = "failed"


class CancelOutcome(StrEnum):
    """What a cancel request did."""

    CANCELLED = "cancelled"  # it was pending: cancelled at once
    REQUESTED = "requested"  # it is running: its daemon cancels it within a heartbeat
    FINISHED = "finished"  # already completed, failed or cancelled
    NOT_FOUND = "not_found"


class RetryOutcome(StrEnum):
    """What a manual retry did."""

    RETRIED = "retried"
    NOT_RETRYABLE = "not_retryable"  # pending, processing or completed
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class LeaseRenewal:
    """Which held jobs were renewed, and which of those have a cancel request."""

    renewed: frozenset[int]
    cancel_requested: frozenset[int]


@dataclass(frozen=True, slots=True)
class RescueResult:
    """Jobs with expired leases: back to pending, failed for good, or cancelled."""

    rescued: tuple[int, ...] = ()
    failed: tuple[int, ...] = ()
    cancelled: tuple[int, ...] = ()


# --- enqueue -----------------------------------------------------------------------------


async def enqueue_task(
    session: AsyncSession, *, now: datetime | None = None, **spec: Any
) -> EnqueuedTask:
    """Insert one pending task (keyword arguments as in TaskSpec); an existing task with the
    same idempotency key is returned instead, with ``created=False``."""
    [result] = await enqueue_tasks(session, [TaskSpec(**spec)], now=now)
    return result


async def enqueue_tasks(
    session: AsyncSession,
    specs: Sequence[TaskSpec | Mapping[str, Any]],
    *,
    now: datetime | None = None,
) -> list[EnqueuedTask]:
    """Insert many pending tasks in the caller's transaction; results in the input order."""
    items = [s if isinstance(s, TaskSpec) else TaskSpec(**s) for s in specs]
    results: dict[int, EnqueuedTask] = {}
    plain = [i for i, s in enumerate(items) if s.idempotency_key is None]
    keyed = [i for i, s in enumerate(items) if s.idempotency_key is not None]
    if plain:
        ids = await _insert_plain(session, [items[i].row() for i in plain], now)
        results.update(
            {i: EnqueuedTask(task_id, True) for i, task_id in zip(plain, ids, strict=True)}
        )
    if keyed:
        by_key = await _insert_keyed(session, [items[i] for i in keyed], now)
        results.update({i: by_key[items[i].idempotency_key or ""] for i in keyed})
    return [results[i] for i in range(len(items))]


def _insert_values(dialect: str, now: datetime | None) -> dict[str, Any]:
    current = now_sql(dialect, now)
    sched = func.coalesce(bindparam("sched", type_=UTCDateTime()), current)
    return {
        "scheduled_at": sched,
        "created_at": current,
        "updated_at": current,
        "status": TaskStatus.PENDING.value,
        "retry_count": 0,
        "attempts": 0,
        "token_usage": 0,
    }


async def _insert_plain(
    session: AsyncSession, rows: list[dict[str, Any]], now: datetime | None
) -> list[int]:
    stmt = (
        insert(T)
        .values(**_insert_values(dialect_of(session), now))
        .returning(T.id, sort_by_parameter_order=True)
    )
    return list((await session.scalars(stmt, rows)).all())


async def _insert_keyed(
    session: AsyncSession, specs: list[TaskSpec], now: datetime | None
) -> dict[str, EnqueuedTask]:
    dialect = dialect_of(session)
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(T)
    stmt = (
        ins.values(**_insert_values(dialect, now))
        .on_conflict_do_nothing(index_elements=[T.idempotency_key])
        .returning(T.id, T.idempotency_key)
    )
    created: dict[str, EnqueuedTask] = {
        key: EnqueuedTask(task_id, True)
        for task_id, key in (await session.execute(stmt, [s.row() for s in specs])).all()
        if key
    }
    missing = {s.idempotency_key for s in specs} - created.keys()
    if missing:
        found = await session.execute(
            select(T.id, T.idempotency_key).where(T.idempotency_key.in_(missing))
        )
        created.update({key: EnqueuedTask(task_id, False) for task_id, key in found.all() if key})
    return created


async def notify_daemons(session: AsyncSession) -> None:
    """Wake listening daemons at commit (PostgreSQL; inserts do it by trigger)."""
    if dialect_of(session) == "postgresql":
        await session.execute(select(func.pg_notify(NOTIFY_CHANNEL, "")))


# --- claim and leases ----------------------------------------------------------------------


async def claim_tasks(
    session: AsyncSession,
    *,
    processor_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    only_ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> list[ClaimedTask]:
    """pending → processing for up to ``limit`` due tasks, in one statement; writes their
    ``started`` notifications. Highest priority first, then oldest schedule, then id.
    ``only_ids`` restricts the claim to those tasks (inline mode)."""
    if limit <= 0:
        return []
    dialect = dialect_of(session)
    current = now_sql(dialect, now)
    # The order matches the partial pending index, so the scan stops after `limit` rows;
    # SKIP LOCKED lets daemons claim side by side without waiting on each other.
    # status as a literal, so the planner can match the partial index's predicate even
    # in a generic (parameter-blind) plan.
    pick = select(T.id).where(T.status == _PENDING_LITERAL, T.scheduled_at <= current)
    if queues:
        pick = pick.where(T.queue.in_(list(queues)))
    if only_ids is not None:
        pick = pick.where(T.id.in_(list(only_ids)))
    pick = (
        pick.order_by(T.priority.desc(), T.scheduled_at, T.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(T)
        .where(T.id.in_(pick.scalar_subquery()))
        .values(
            status=TaskStatus.PROCESSING,
            locked_by=processor_id,
            attempts=T.attempts + 1,
            started_at=current,
            updated_at=current,
            lease_expires_at=later_sql(dialect, lease_seconds, now),
        )
        .returning(
            *REF_COLUMNS,
            T.queue,
            T.payload,
            T.priority,
            T.retry_count,
            T.max_retries,
            T.timeout_seconds,
            T.scheduled_at,
            T.created_at,
        )
    )
    claimed = [ClaimedTask.from_row(r) for r in (await session.execute(stmt)).all()]
    claimed.sort(key=lambda t: (-t.priority, t.scheduled_at, t.id))
    await notifications.add(
        session,
        [
            notifications.build(
                NotificationType.STARTED, t.ref, f"Attempt {t.attempt} of {t.kind} started."
            )
            for t in claimed
        ],
    )
    return claimed


def _held(processor_id: str, tasks: Iterable[tuple[int, int]]) -> ColumnElement[bool]:
    pairs = list(tasks)
    return and_(
        T.status == TaskStatus.PROCESSING,
        T.locked_by == processor_id,
        tuple_(T.id, T.attempts).in_(pairs),
    )


def _unlocked(current: ColumnElement[datetime]) -> dict[str, Any]:
    """The columns every transition out of processing clears."""
    return {"locked_by": None, "lease_expires_at": None, "updated_at": current}


def _fenced(task_id: int, processor_id: str, attempt: int) -> ColumnElement[bool]:
    return and_(
        T.id == task_id,
        T.status == TaskStatus.PROCESSING,
        T.locked_by == processor_id,
        T.attempts == attempt,
    )


async def renew_leases(
    session: AsyncSession,
    *,
    processor_id: str,
    tasks: Sequence[tuple[int, int]],
    lease_seconds: float,
    now: datetime | None = None,
) -> LeaseRenewal:
    """Extend the leases of held (id, attempt) pairs in one statement; a pair missing from
    ``renewed`` is no longer ours. Also reports cancel requests."""
    if not tasks:
        return LeaseRenewal(frozenset(), frozenset())
    dialect = dialect_of(session)
    stmt = (
        update(T)
        .where(_held(processor_id, tasks))
        .values(lease_expires_at=later_sql(dialect, lease_seconds, now))
        .returning(T.id, T.cancel_requested)
    )
    rows = (await session.execute(stmt)).all()
    return LeaseRenewal(
        frozenset(r.id for r in rows), frozenset(r.id for r in rows if r.cancel_requested)
    )


async def release_tasks(
    session: AsyncSession, *, processor_id: str, tasks: Sequence[tuple[int, int]]
) -> int:
    """Shutdown: held tasks back to pending without charging the attempt or a retry (or to
    cancelled when a cancel was requested). Returns how many were released."""
    if not tasks:
        return 0
    current = now_sql(dialect_of(session))
    stmt = (
        update(T)
        .where(_held(processor_id, tasks))
        .values(
            status=case((T.cancel_requested, TaskStatus.CANCELLED), else_=TaskStatus.PENDING),
            completed_at=case((T.cancel_requested, current), else_=None),
            attempts=T.attempts - 1,
            locked_by=None,
            lease_expires_at=None,
            updated_at=current,
        )
        .returning(*REF_COLUMNS, T.status)
    )
    rows = (await session.execute(stmt)).all()
    await notifications.add(
        session,
        [_cancelled_note(TaskRef.from_row(r)) for r in rows if r.status == TaskStatus.CANCELLED],
    )
    return len(rows)


def _cancelled_note(task: TaskRef) -> dict[str, Any]:
    return notifications.build(NotificationType.CANCELLED, task, "Cancelled on request.")


# --- outcomes (fenced) -----------------------------------------------------------------------


async def complete_task(
    session: AsyncSession,
    *,
    task_id: int,
    processor_id: str,
    attempt: int,
    result: Any,
    duration_seconds: float | None = None,
    token_usage: int = 0,
    now: datetime | None = None,
) -> bool:
    """processing → completed with its result; False when the fence rejected the write."""
    current = now_sql(dialect_of(session), now)
    stmt = (
        update(T)
        .where(_fenced(task_id, processor_id, attempt))
        .values(
            status=TaskStatus.COMPLETED,
            result=result,
            error=None,
            completed_at=current,
            duration_seconds=duration_seconds,
            **_unlocked(current),
            token_usage=T.token_usage + token_usage,
        )
        .returning(*REF_COLUMNS)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return False
    message = "Finished." if duration_seconds is None else f"Finished in {duration_seconds:.2f} s."
    note = notifications.build(
        NotificationType.COMPLETED,
        TaskRef.from_row(row),
        message,
        duration_seconds=duration_seconds,
    )
    await notifications.add(session, [note])
    return True


async def fail_task(
    session: AsyncSession,
    *,
    task_id: int,
    processor_id: str,
    attempt: int,
    error: str,
    retry_delay: float,
    permanent: bool = False,
    duration_seconds: float | None = None,
    token_usage: int = 0,
    now: datetime | None = None,
) -> FailOutcome | None:
    """processing → pending after ``retry_delay`` seconds while retries remain (and the
    error is not permanent), else → failed. None when the fence rejected the write."""
    dialect = dialect_of(session)
    current = now_sql(dialect, now)
    retry = false() if permanent else T.retry_count < T.max_retries
    stmt = (
        update(T)
        .where(_fenced(task_id, processor_id, attempt))
        .values(
            status=case((retry, TaskStatus.PENDING), else_=TaskStatus.FAILED),
            retry_count=case((retry, T.retry_count + 1), else_=T.retry_count),
            scheduled_at=case((retry, later_sql(dialect, retry_delay, now)), else_=T.scheduled_at),
            completed_at=case((retry, None), else_=current),
            error=error,
            **_unlocked(current),
            duration_seconds=duration_seconds,
            token_usage=T.token_usage + token_usage,
        )
        .returning(*REF_COLUMNS, T.status, T.retry_count, T.max_retries, T.scheduled_at)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return None
    task = TaskRef.from_row(row)
    short = notifications.truncate_error(error)
    if row.status == TaskStatus.PENDING:
        note = notifications.build(
            NotificationType.RETRYING,
            task,
            f"Attempt {task.attempts} failed; retry {row.retry_count} of {row.max_retries} "
            f"in {retry_delay:.0f} s.",
            error=short,
            retry_at=row.scheduled_at.isoformat(),
        )
        await notifications.add(session, [note])
        return FailOutcome.RETRYING
    note = notifications.build(
        NotificationType.FAILED, task, notifications.headline(error), error=short
    )
    await notifications.add(session, [note])
    return FailOutcome.FAILED


async def cancel_task(
    session: AsyncSession,
    *,
    task_id: int,
    processor_id: str,
    attempt: int,
    duration_seconds: float | None = None,
    now: datetime | None = None,
) -> bool:
    """processing → cancelled by the daemon that ran it; False when fenced out."""
    current = now_sql(dialect_of(session), now)
    stmt = (
        update(T)
        .where(_fenced(task_id, processor_id, attempt))
        .values(
            status=TaskStatus.CANCELLED,
            completed_at=current,
            duration_seconds=duration_seconds,
            **_unlocked(current),
        )
        .returning(*REF_COLUMNS)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return False
    await notifications.add(session, [_cancelled_note(TaskRef.from_row(row))])
    return True


async def update_progress(
    session: AsyncSession,
    *,
    task_id: int,
    processor_id: str,
    attempt: int,
    current: int,
    total: int | None,
    message: str | None = None,
    notify: bool = False,
) -> bool:
    """Record a running job's progress (fenced); with ``notify``, also a notification."""
    stmt = (
        update(T)
        .where(_fenced(task_id, processor_id, attempt))
        .values(progress_current=current, progress_total=total, progress_message=message)
        .returning(*REF_COLUMNS)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return False
    if notify:
        pct = notifications.percent(current, total)
        text = message or (f"{pct:.0f} %" if pct is not None else f"step {current}")
        note = notifications.build(
            NotificationType.PROGRESS,
            TaskRef.from_row(row),
            text,
            current=current,
            total=total,
            percent=pct,
        )
        await notifications.add(session, [note])
    return True


# --- requests from users and operators -----------------------------------------------------


async def request_cancel(
    session: AsyncSession, task_id: int, *, now: datetime | None = None
) -> CancelOutcome:
    """pending → cancelled at once; processing → flagged for its daemon; else FINISHED."""
    current = now_sql(dialect_of(session), now)
    pending = (
        update(T)
        .where(T.id == task_id, T.status == TaskStatus.PENDING)
        .values(status=TaskStatus.CANCELLED, completed_at=current, updated_at=current)
        .returning(*REF_COLUMNS)
    )
    row = (await session.execute(pending)).first()
    if row is not None:
        await notifications.add(session, [_cancelled_note(TaskRef.from_row(row))])
        return CancelOutcome.CANCELLED
    running = (
        update(T)
        .where(T.id == task_id, T.status == TaskStatus.PROCESSING)
        .values(cancel_requested=True, updated_at=current)
        .returning(T.id)
    )
    if (await session.execute(running)).first() is not None:
        return CancelOutcome.REQUESTED
    exists = await session.scalar(select(T.id).where(T.id == task_id))
    return CancelOutcome.FINISHED if exists is not None else CancelOutcome.NOT_FOUND


def _retry_values(current: ColumnElement[datetime]) -> dict[str, Any]:
    return {
        "status": TaskStatus.PENDING,
        "retry_count": 0,
        "attempts": 0,
        "scheduled_at": current,
        "updated_at": current,
        "completed_at": None,
        "started_at": None,
        "result": None,
        "error": None,
        "cancel_requested": False,
        "progress_current": None,
        "progress_total": None,
        "progress_message": None,
        "duration_seconds": None,
    }


RETRYABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED)


async def retry_task(
    session: AsyncSession, task_id: int, *, now: datetime | None = None
) -> RetryOutcome:
    """failed or cancelled → pending, with a fresh retry budget, due now."""
    current = now_sql(dialect_of(session), now)
    stmt = (
        update(T)
        .where(T.id == task_id, T.status.in_(RETRYABLE))
        .values(**_retry_values(current))
        .returning(T.id)
    )
    if (await session.execute(stmt)).first() is not None:
        await notify_daemons(session)
        return RetryOutcome.RETRIED
    exists = await session.scalar(select(T.id).where(T.id == task_id))
    return RetryOutcome.NOT_RETRYABLE if exists is not None else RetryOutcome.NOT_FOUND


def _matching(status: str, kind: str | None) -> ColumnElement[bool]:
    if status not in RETRYABLE:
        raise InvalidTaskError(f"only failed or cancelled tasks can be retried, not {status!r}")
    return and_(T.status == status, T.kind == kind) if kind else T.status == status


async def count_retryable(session: AsyncSession, *, status: str, kind: str | None = None) -> int:
    """How many tasks ``retry_tasks`` would put back (for a confirmation prompt)."""
    stmt = select(func.count()).select_from(T).where(_matching(status, kind))
    return int((await session.execute(stmt)).scalar_one())


async def retry_tasks(
    session: AsyncSession, *, status: str, kind: str | None = None, now: datetime | None = None
) -> int:
    """Every ``status`` (failed or cancelled) task, of ``kind`` when given, back to pending
    with a fresh retry budget; one statement. Returns how many."""
    current = now_sql(dialect_of(session), now)
    stmt = update(T).where(_matching(status, kind)).values(**_retry_values(current)).returning(T.id)
    count = len((await session.execute(stmt)).all())
    if count:
        await notify_daemons(session)
    return count


# --- maintenance -------------------------------------------------------------------------------


async def rescue_expired(session: AsyncSession, *, now: datetime | None = None) -> RescueResult:
    """processing tasks whose lease expired (their daemon died or hung): → failed when
    their attempts are spent (a poison job cannot crash-loop), else → pending (or
    cancelled, when a cancel was requested), with notifications."""
    current = now_sql(dialect_of(session), now)
    expired = and_(T.status == TaskStatus.PROCESSING, T.lease_expires_at < current)
    common = _unlocked(current)
    spent = (
        update(T)
        .where(expired, T.attempts >= T.max_retries + 1, T.cancel_requested.is_(False))
        .values(
            status=TaskStatus.FAILED,
            completed_at=current,
            error=LEASE_EXPIRED_ERROR + "; no attempts left",
            **common,
        )
        .returning(*REF_COLUMNS)
    )
    failed = [TaskRef.from_row(r) for r in (await session.execute(spent)).all()]
    back = (
        update(T)
        .where(expired)
        .values(
            status=case((T.cancel_requested, TaskStatus.CANCELLED), else_=TaskStatus.PENDING),
            completed_at=case((T.cancel_requested, current), else_=None),
            retry_count=case((T.cancel_requested, T.retry_count), else_=T.retry_count + 1),
            error=LEASE_EXPIRED_ERROR,
            **common,
        )
        .returning(*REF_COLUMNS, T.status)
    )
    rows = (await session.execute(back)).all()
    rescued = [TaskRef.from_row(r) for r in rows if r.status == TaskStatus.PENDING]
    cancelled = [TaskRef.from_row(r) for r in rows if r.status == TaskStatus.CANCELLED]
    notes = [
        notifications.build(
            NotificationType.FAILED, t, LEASE_EXPIRED_ERROR, error=LEASE_EXPIRED_ERROR
        )
        for t in failed
    ]
    notes += [
        notifications.build(NotificationType.RETRYING, t, LEASE_EXPIRED_ERROR + "; retrying.")
        for t in rescued
    ]
    notes += [_cancelled_note(t) for t in cancelled]
    await notifications.add(session, notes)
    return RescueResult(
        tuple(t.id for t in rescued), tuple(t.id for t in failed), tuple(t.id for t in cancelled)
    )


def _prunable(completed_before: datetime, failed_before: datetime) -> ColumnElement[bool]:
    return or_(
        and_(T.status == TaskStatus.COMPLETED, T.completed_at < completed_before),
        and_(
            T.status.in_([TaskStatus.FAILED, TaskStatus.CANCELLED]), T.completed_at < failed_before
        ),
    )


async def count_prunable(
    session: AsyncSession, *, completed_before: datetime, failed_before: datetime | None = None
) -> int:
    """How many tasks ``prune_finished`` would delete (``prune --dry-run``)."""
    stmt = (
        select(func.count())
        .select_from(T)
        .where(_prunable(completed_before, failed_before or completed_before))
    )
    return int((await session.execute(stmt)).scalar_one())


async def prune_finished(
    session: AsyncSession,
    *,
    completed_before: datetime,
    failed_before: datetime | None = None,
    batch_size: int = PRUNE_BATCH_SIZE,
) -> int:
    """Delete up to ``batch_size`` finished tasks: completed ones finished before
    ``completed_before``, failed and cancelled ones before ``failed_before`` (default: the
    same). Their notifications go with them. Returns how many; call again while it is
    ``batch_size``, each call in its own short transaction."""
    where = _prunable(completed_before, failed_before or completed_before)
    doomed = select(T.id).where(where).limit(batch_size)
    result = await session.execute(
        delete(T).where(T.id.in_(doomed.scalar_subquery())).returning(T.id)
    )
    return len(result.all())


# --- processors --------------------------------------------------------------------------------


async def register_processor(
    session: AsyncSession,
    *,
    processor_id: str,
    hostname: str,
    pid: int,
    version: str,
    concurrency: int,
    queues: str = "*",
) -> None:
    """Insert this daemon's processors row (state running)."""
    current = now_sql(dialect_of(session))
    await session.execute(
        insert(Processor).values(
            id=processor_id,
            hostname=hostname,
            pid=pid,
            version=version,
            concurrency=concurrency,
            queues=queues,
            started_at=current,
            last_seen_at=current,
            in_flight=0,
            state=ProcessorState.RUNNING,
            processed=0,
            failed=0,
        )
    )


async def touch_processor(
    session: AsyncSession,
    *,
    processor_id: str,
    in_flight: int,
    processed: int,
    failed: int,
    state: ProcessorState | None = None,
) -> bool:
    """Heartbeat of the processors row; False when the row is gone."""
    values: dict[str, Any] = {
        "last_seen_at": now_sql(dialect_of(session)),
        "in_flight": in_flight,
        "processed": processed,
        "failed": failed,
    }
    if state is not None:
        values["state"] = state
    result = await session.execute(
        update(Processor)
        .where(Processor.id == processor_id)
        .values(**values)
        .returning(Processor.id)
    )
    return result.first() is not None


async def reap_processors(session: AsyncSession, *, stale_before: datetime) -> int:
    """Mark processors that stopped heartbeating before ``stale_before`` as stopped."""
    result = await session.execute(
        update(Processor)
        .where(Processor.state != ProcessorState.STOPPED, Processor.last_seen_at < stale_before)
        .values(state=ProcessorState.STOPPED, in_flight=0)
        .returning(Processor.id)
    )
    return len(result.all())


# --- reads -----------------------------------------------------------------------------------


async def get_task(
    session: AsyncSession, task_id: int, *, user_id: str | None = None
) -> PendingAnalysis | None:
    """One task; with ``user_id``, only if it belongs to that user."""
    stmt = select(T).where(T.id == task_id)
    if user_id is not None:
        stmt = stmt.where(T.user_id == user_id)
    return (await session.scalars(stmt)).first()


async def list_tasks(
    session: AsyncSession,
    *,
    user_id: str | None = None,
    status: str | None = None,
    kind: str | None = None,
    project_id: str | None = None,
    chapter_id: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[PendingAnalysis]:
    """Newest first; ``before_id`` is the cursor (the last id of the previous page)."""
    stmt = select(T)
    for column, value in (
        (T.user_id, user_id),
        (T.status, status),
        (T.kind, kind),
        (T.project_id, project_id),
        (T.chapter_id, chapter_id),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if before_id is not None:
        stmt = stmt.where(T.id < before_id)
    return list((await session.scalars(stmt.order_by(T.id.desc()).limit(limit))).all())


async def latest_for_chapter(
    session: AsyncSession, chapter_id: str, *, user_id: str | None = None
) -> PendingAnalysis | None:
    """The newest task of a chapter (of that user, when given)."""
    tasks = await list_tasks(session, chapter_id=chapter_id, user_id=user_id, limit=1)
    return tasks[0] if tasks else None


def is_finished(status: str) -> bool:
    """True for completed, failed and cancelled."""
    return status in FINISHED_STATUSES


async def snooze_task(
    session: AsyncSession,
    *,
    task_id: int,
    processor_id: str,
    attempt: int,
    seconds: float,
    now: datetime | None = None,
) -> bool:
    """processing → pending after ``seconds``, without charging the attempt or a retry."""
    dialect = dialect_of(session)
    stmt = (
        update(T)
        .where(_fenced(task_id, processor_id, attempt))
        .values(
            status=TaskStatus.PENDING,
            scheduled_at=later_sql(dialect, seconds, now),
            attempts=T.attempts - 1,
            updated_at=now_sql(dialect, now),
            locked_by=None,
            lease_expires_at=None,
        )
        .returning(T.id)
    )
    return (await session.execute(stmt)).first() is not None
