"""Notification rows: built and inserted inside the queue's transactions; read by the API."""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    String,
    Table,
    Text,
    any_,
    bindparam,
    cast,
    delete,
    false,
    func,
    insert,
    literal,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database, dialect_of, now_sql
from app.models import AnalysisNotification, NotificationType, PendingAnalysis
from app.models.types import UTCDateTime, pg_array, utcnow
from app.services import auth, hotpath, readable

NOTIFICATIONS: Table = AnalysisNotification.__table__  # type: ignore[assignment]
N = NOTIFICATIONS.c
MAX_ERROR_CHARS = 1_000
PROGRESS_MIN_INTERVAL_SECONDS = 1.0
PROGRESS_MIN_STEP_PERCENT = 10.0
FEED_LOCK_KEY = 0x6170_6E6F_7469_6679  # "apnotify": orders notification ids by commit

_ROW_KEYS = ("user_id", "project_id", "chapter_id", "task_id", "type", "title", "message", "data")
_TITLES = {
    NotificationType.STARTED: "Analysis started",
    NotificationType.PROGRESS: "Analysis in progress",
    NotificationType.RETRYING: "Analysis will be retried",
    NotificationType.COMPLETED: "Analysis completed",
    NotificationType.FAILED: "Analysis failed",
    NotificationType.CANCELLED: "Analysis cancelled",
}


@dataclass(frozen=True, slots=True)
class TaskRef:
    """What a notification needs to know about its task."""

    id: int
    kind: str
    user_id: str | None
    project_id: str | None
    chapter_id: str | None
    attempts: int

    @classmethod
    def from_row(cls, row: Any) -> TaskRef:
        """Build from a row holding the columns of ``queue.REF_COLUMNS``."""
        kind = row.kind if isinstance(row.kind, str) else readable.as_text(row.kind)
        return cls(row.id, kind, row.user_id, row.project_id, row.chapter_id, row.attempts)


def percent(current: int | None, total: int | None) -> float | None:
    """Progress as a percentage in [0, 100], or None when unknown."""
    if current is None or not total:
        return None
    return round(max(0.0, min(100.0, 100.0 * current / total)), 1)


def build(kind: NotificationType, task: TaskRef, message: str, **data: Any) -> dict[str, Any]:
    """One notification row (as insert parameters) about ``task``."""
    return {
        "user_id": task.user_id,
        "project_id": task.project_id,
        "chapter_id": task.chapter_id,
        "task_id": task.id,
        "type": kind.value,
        "title": _TITLES[kind],
        "message": message,
        "data": {"task_id": task.id, "kind": task.kind, "attempt": task.attempts, **data},
    }


def started_message(attempt: int, kind: str) -> str:
    """The ``started`` notification's message (PostgreSQL's one-statement claim writes the
    same text in SQL: ``started_insert``)."""
    return f"Attempt {attempt} of {kind} started."


def started_insert(claimed: Any, order_by: Sequence[Any]) -> Any:
    """PostgreSQL: an INSERT of the ``started`` notifications of the rows of ``claimed`` (a
    CTE over the claim's RETURNING), as ``build`` would write them, after the feed's lock
    (the one-time filter of ``_insert_after_feed_lock``)."""
    c = claimed.c
    message = (
        literal("Attempt ", Text())
        + cast(c.attempts, Text())
        + literal(" of ", Text())
        + c.kind
        + literal(" started.", Text())
    )
    data = func.jsonb_build_object(
        literal_column("'task_id'"),
        c.id,
        literal_column("'kind'"),
        c.kind,
        literal_column("'attempt'"),
        c.attempts,
    )
    rows = (
        select(
            c.user_id,
            c.project_id,
            c.chapter_id,
            c.id,
            literal(NotificationType.STARTED.value, String()),
            literal(_TITLES[NotificationType.STARTED], String()),
            message,
            data,
            false(),
            func.now(),
        )
        .where(_feed_lock_gate())
        .order_by(*order_by)
    )
    return insert(NOTIFICATIONS).from_select([*_ROW_KEYS, "is_read", "created_at"], rows)


def locked_in_id_order(*where: Any) -> ColumnElement[bool]:
    """PostgreSQL: a condition on notification ids that first locks the rows ``where``
    selects, in id order (an InitPlan: ``SELECT array_agg(id) FROM (SELECT id … ORDER BY id
    FOR UPDATE)``), then matches them by primary key. Every statement that writes many
    notifications at once takes its rows this way (read-all, retract_started, the
    pruner's): two of them taking the same rows in different orders deadlocked."""
    locked = select(N.id).where(*where).order_by(N.id).with_for_update().subquery()
    ids = select(func.array_agg(locked.c.id)).scalar_subquery()
    return N.id == any_(cast(ids, pg_array(BigInteger())))


async def retract_started(session: AsyncSession, task_ids: Sequence[int]) -> None:
    """Delete the newest ``started`` notification of each task: its claim wrote it, and
    the job was handed back (or cancelled) before its handler ran, so it never started.
    Without this the feed held "started" for a job that then waited, and "started" again
    when it did run. In the caller's transaction, which holds the tasks (nobody else claims
    them meanwhile, so the newest ``started`` is that claim's). A client that already read
    it keeps what it saw (a feed's ids can go: marking a deleted one read answers 404).
    The rows are locked in id order, as ``mark_all_read`` locks a user's (PostgreSQL: two
    transactions locking the same rows in opposite orders deadlock)."""
    if not task_ids:
        return
    newest = (
        select(func.max(N.id))
        .where(N.task_id.in_(task_ids), N.type == NotificationType.STARTED.value)
        .group_by(N.task_id)
    )
    if dialect_of(session) == "postgresql":
        await session.execute(delete(NOTIFICATIONS).where(locked_in_id_order(N.id.in_(newest))))
    else:  # one writer at a time
        await session.execute(delete(NOTIFICATIONS).where(N.id.in_(newest)))


def _feed_lock_gate() -> Any:
    # An uncorrelated subquery in WHERE is a one-time filter: evaluated once, before the
    # first row reaches the insert and draws its id.
    lock = select(cast(func.pg_advisory_xact_lock(FEED_LOCK_KEY), Text())).scalar_subquery()
    return lock == literal_column("''")


def truncate_error(error: str) -> str:
    """Errors are kept whole on the task, traceback and all; notifications, which go to the
    end user's frontend, carry the first paragraph (the exception and its message: the
    executor puts the traceback after a blank line), at most MAX_ERROR_CHARS of it. A
    traceback shows the server's paths and code and tells the user nothing."""
    error = error.strip().split("\n\n", 1)[0] or "failed"
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 1] + "…"


def headline(error: str) -> str:
    """The first line of an error (no traceback), for a notification's message."""
    first = error.strip().splitlines()[0] if error.strip() else "failed"
    return first if len(first) <= 300 else first[:299] + "…"


async def add(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Insert notification rows in the caller's transaction (one statement).

    On PostgreSQL the transaction first takes a transaction-level advisory lock, so ids are
    drawn and committed in the same order: a client paging with ``after_id`` can never see
    id n+1 before id n commits and skip it for good.
    """
    if not rows:
        return
    deferred = session.info.get(_DEFERRED)
    if deferred is not None:
        deferred.extend(rows)
        return
    if dialect_of(session) == "postgresql":
        await hotpath.fetch(session, _INSERT_AFTER_FEED_LOCK, array_params(rows))
        return
    document = _sqlite_document(rows, session.get_bind().dialect)
    if document is None:
        await hotpath.execute_many(session, _INSERT, _stamped(rows))
    else:
        await hotpath.fetch(session, _sqlite_document_insert(), document)


def add_sqlite3(conn: sqlite3.Connection, dialect: Dialect, rows: Sequence[dict[str, Any]]) -> None:
    """``add`` on a bare ``sqlite3`` connection, in the caller's transaction."""
    if not rows:
        return
    document = _sqlite_document(rows, dialect)
    if document is None:
        hotpath.sqlite3_execute_many(conn, dialect, _INSERT, _stamped(rows))
    else:
        hotpath.sqlite3_fetch(conn, dialect, _sqlite_document_insert(), document)


def _stamped(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """SQLite: the rows with this host's clock as their created_at (one value for all)."""
    clock = utcnow()
    return [{**row, "n_created_at": clock} for row in rows]


#: SQLite 3.38 brought the ``->``/``->>`` operators the document INSERT reads rows with.
SQLITE_JSON_ARROWS = sqlite3.sqlite_version_info >= (3, 38, 0)
#: ``json.dumps(value, ensure_ascii=False, allow_nan=False)``, its encoder built once: text
#: stays UTF-8 (a lone surrogate then fails the insert, as binding it would). A cycle ends
#: in RecursionError and the rows take the executemany, whose encoder says what is wrong.
_DOCUMENT_ENCODER = hotpath.json_encoder(ensure_ascii=False)


def _sqlite_document(rows: Sequence[dict[str, Any]], dialect: Dialect) -> dict[str, Any] | None:
    """SQLite: the parameters of ``_sqlite_document_insert`` for ``rows`` (``build``'s
    dicts), or None when they go one by one instead: a single row, SQLite before 3.38, a
    value JSON cannot carry as is (NaN, an object ``json`` cannot encode), which the
    one-row INSERT's own encoding then accepts or refuses as it always has, a string
    holding a NUL (an exception's text can), which ``->>`` would cut short, or an engine
    with a JSON serializer of its own."""
    if len(rows) < 2 or not SQLITE_JSON_ARROWS or _DOCUMENT_ENCODER is None:
        return None
    if getattr(dialect, "_json_serializer", None) is not None:  # an engine's own encoding
        return None
    try:
        text = "".join(_DOCUMENT_ENCODER([[row[k] for k in _ROW_KEYS] for row in rows], 0))
    except (TypeError, ValueError, RecursionError):
        return None
    if "\\u0000" in text:  # a NUL in a string: SQLite's ->> would end the text there
        return None
    return {"n_rows": text, "n_created_at": utcnow()}


@functools.cache
def _sqlite_document_insert() -> Any:
    """SQLite: many notification rows in ONE INSERT … SELECT FROM json_each(document), each
    row an array of the ``_ROW_KEYS`` values in order (``data`` as a JSON object, stored as
    SQLite writes it back, without spaces). An executemany of the one-row INSERT steps it
    once per row, with every value bound in Python and the AUTOINCREMENT counter written
    each time: ~1.5x the time per row, most of it Python on the daemon's write thread."""
    doc = func.json_each(bindparam("n_rows", type_=Text())).table_valued("key", "value").alias("n")
    fields = [
        doc.c.value.op("->" if name == "data" else "->>")(literal_column(str(i))).label(name)
        for i, name in enumerate(_ROW_KEYS)
    ]
    created = bindparam("n_created_at", type_=UTCDateTime())
    pick = select(*fields, false(), created).order_by(doc.c.key)
    return insert(NOTIFICATIONS).from_select([*_ROW_KEYS, "is_read", "created_at"], pick)


# Built once (each call would otherwise build the statement and its cache key again).


def array_params(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """PostgreSQL: the parameters of the one-statement INSERT of ``rows`` (``build``'s dicts),
    a column an array (``add``, ``insert_for_tasks``)."""
    return {f"n_{name}": [row[name] for row in rows] for name in _ROW_KEYS}


def insert_for_tasks(task_ids: Any) -> Any:
    """PostgreSQL: ``add``'s one-statement INSERT (``array_params``), keeping only the rows
    whose task is among ``task_ids`` (a subquery: the ids a CTE updated), after the feed's
    lock."""
    return _insert_after_feed_lock(task_ids)


def _insert_after_feed_lock(task_ids: Any = None) -> Any:
    """PostgreSQL: every row of the batch in ONE statement (arrays unnested), which first
    takes the feed's advisory lock: an uncorrelated subquery in WHERE is a one-time filter,
    evaluated before the first row reaches the insert and draws its id. One round trip
    instead of a lock statement plus one execution per row."""
    arrays = [
        bindparam(f"n_{name}", type_=pg_array(JSONB() if name == "data" else N[name].type))
        for name in _ROW_KEYS
    ]
    rows = func.unnest(*arrays).table_valued(*_ROW_KEYS).render_derived(name="v")
    pick = select(*(rows.c[name] for name in _ROW_KEYS), false(), func.now()).where(
        _feed_lock_gate()
    )
    if task_ids is not None:
        pick = pick.where(rows.c.task_id.in_(task_ids))
    return insert(NOTIFICATIONS).from_select([*_ROW_KEYS, "is_read", "created_at"], pick)


_INSERT_AFTER_FEED_LOCK = _insert_after_feed_lock()
_INSERT = insert(NOTIFICATIONS).values(
    created_at=bindparam("n_created_at", type_=UTCDateTime()), is_read=False
)


_DEFERRED = "async_processor_deferred_notifications"


@asynccontextmanager
async def deferred(session: AsyncSession) -> AsyncIterator[None]:
    """Collect the notifications written inside the block and insert them in one statement
    at its end. The feed lock is then the last lock the transaction takes, so it never
    waits on a row while holding it."""
    session.info[_DEFERRED] = []
    try:
        yield
        rows = session.info[_DEFERRED]
    finally:
        session.info.pop(_DEFERRED, None)
    await add(session, rows)


class ProgressThrottle:
    """Decides when a progress update also deserves a notification.

    The task row always gets the latest progress; notifications go out at most once per
    ``interval`` seconds unless progress moved by ``step`` percent or reached the end.
    """

    def __init__(
        self,
        *,
        interval: float = PROGRESS_MIN_INTERVAL_SECONDS,
        step: float = PROGRESS_MIN_STEP_PERCENT,
    ) -> None:
        self._interval = interval
        self._step = step
        self._last_at: float | None = None
        self._last_percent = -100.0

    def should_notify(self, current_percent: float | None, *, clock: float | None = None) -> bool:
        """True when this update should write a notification; records it if so."""
        at = time.monotonic() if clock is None else clock
        value = -1.0 if current_percent is None else current_percent
        due = (
            self._last_at is None
            or at - self._last_at >= self._interval
            or abs(value - self._last_percent) >= self._step
            or value >= 100.0
        )
        if due:
            self._last_at, self._last_percent = at, value
        return due

    def forget(self) -> None:
        """The notification it allowed was not written: the next update sends one."""
        self._last_at = None


async def list_for_user(
    session: AsyncSession,
    *,
    user_id: str | None,
    after_id: int | None = None,
    unread_only: bool = False,
    limit: int = 50,
    max_id: int | None = None,
    task_id: int | None = None,
) -> list[AnalysisNotification]:
    """Newest first; with ``after_id``, the ones after it oldest first (paging forward).

    ``user_id`` None means every user's (admin). ``max_id`` caps the ids served (the
    feed's commit horizon on PostgreSQL).
    """
    stmt = _feed_statement(
        user_id is not None,
        unread_only,
        max_id is not None,
        task_id is not None,
        after_id is not None,
    )
    params = {"user_id": user_id, "max_id": max_id, "task_id": task_id, "after_id": after_id}
    bound = {name: value for name, value in params.items() if value is not None}
    return list((await session.scalars(stmt, {**bound, "limit": limit})).all())


@functools.cache
def _feed_statement(
    scoped: bool, unread_only: bool, capped: bool, one_task: bool, forward: bool
) -> Select[AnalysisNotification]:
    """The feed's SELECT for one combination of filters, built once (clients poll it)."""
    stmt = select(AnalysisNotification)
    if scoped:
        stmt = stmt.where(N.user_id == bindparam("user_id"))
    if unread_only:
        stmt = stmt.where(N.is_read == false())
    if capped:
        stmt = stmt.where(N.id <= bindparam("max_id"))
    if one_task:
        stmt = stmt.where(N.task_id == bindparam("task_id"))
    if forward:
        stmt = stmt.where(N.id > bindparam("after_id")).order_by(N.id)
    else:
        stmt = stmt.order_by(N.id.desc())
    return stmt.limit(bindparam("limit", type_=Integer))


async def unread_count(session: AsyncSession, *, user_id: str | None) -> int:
    """How many unread notifications the user has (every user's, for None): read from the
    partial index over unread rows, whose predicate ``is_read = false`` this repeats."""
    if user_id is None:
        return int((await session.execute(_UNREAD)).scalar_one())
    return int((await session.execute(_USERS_UNREAD, {"user_id": user_id})).scalar_one())


_UNREAD = select(func.count()).select_from(NOTIFICATIONS).where(N.is_read == false())
_USERS_UNREAD = _UNREAD.where(N.user_id == bindparam("user_id"))


async def page_for_user(
    db: Database,
    *,
    user_id: str | None,
    after_id: int | None = None,
    unread_only: bool = False,
    limit: int = 50,
    task_id: int | None = None,
) -> tuple[list[Any], int]:
    """GET /notifications: ``list_for_user``'s page and ``unread_count`` read together, in
    ONE statement (one snapshot), on the bare driver where it can (``Database.read_alone``:
    a frontend polls this; through a session it cost ~1 ms of CPU a poll). The page's rows
    carry the notification's columns by name."""
    shape = (user_id is not None, unread_only, task_id is not None, after_id is not None)
    params = {"user_id": user_id, "task_id": task_id, "after_id": after_id}
    bound = {name: value for name, value in params.items() if value is not None}
    bound["limit"] = limit
    rows = await _read_headed(db, _page_statement, shape, bound)
    return [row for row in rows if row.id is not None], int(rows[0].unread_count)


async def stream_page(
    db: Database, *, user_id: str | None, after_id: int, token_id: int, limit: int = 100
) -> tuple[list[Any], bool]:
    """A notification stream's poll: the notifications after ``after_id`` (oldest first)
    and whether its token is still good, read together in ONE statement (one snapshot:
    nothing committed after a revocation goes out), on the bare driver where it can."""
    bound: dict[str, Any] = {"after_id": after_id, "token_id": token_id, "limit": limit}
    if user_id is not None:
        bound["user_id"] = user_id
    rows = await _read_headed(db, _stream_statement, (user_id is not None,), bound)
    return [row for row in rows if row.id is not None], bool(rows[0].token_active)


async def _read_headed(
    db: Database, statement: Callable[..., Any], shape: tuple[bool, ...], params: dict[str, Any]
) -> list[Any]:
    """The rows of the ``_headed`` statement ``statement(*shape)``: at least one (the
    head's). A page holding a notification a hand edit left unreadable is read again
    undecoded, its notifications value by value (app.services.readable), the head as is."""
    try:
        return await _read(db, statement(*shape), params)
    except readable.UNREADABLE_ERRORS:
        rows = await _read(db, statement(*shape, raw=db.dialect), params)
    head = [c.key for c in NOTIFICATIONS.c]
    return [
        row
        if row.id is None
        else SimpleNamespace(
            **{k: v for k, v in row._asdict().items() if k not in head},
            **vars(readable.readable(NOTIFICATIONS.c, row)),
        )
        for row in rows
    ]


async def _read(db: Database, stmt: Any, params: dict[str, Any]) -> list[Any]:
    rows = await db.read_alone(stmt, params, scans=True)
    if rows is None:
        async with db.read_transaction() as session:
            rows = list((await session.execute(stmt, params)).all())
    return rows


def _headed(head: Select[Any], page: Select[Any], *, forward: bool) -> Any:
    """``head`` (a one-row SELECT) left-joined to each row of ``page``, in the page's order:
    one statement, one snapshot; a page of none is the head's row with NULL columns."""
    first = head.subquery("head")
    rows = page.subquery("page")
    return (
        select(*first.c, *rows.c)
        .select_from(first.outerjoin(rows, true()))
        .order_by(rows.c.id if forward else rows.c.id.desc())
    )


@functools.cache
def _page_statement(
    scoped: bool, unread_only: bool, one_task: bool, forward: bool, raw: str | None = None
) -> Any:
    """GET /notifications' statement; ``raw`` (a dialect's name): its notifications'
    columns undecoded (readable.raw_columns)."""
    counted = (
        select(func.count().label("unread_count"))
        .select_from(NOTIFICATIONS)
        .where(N.is_read == false())
    )
    if scoped:
        counted = counted.where(N.user_id == bindparam("user_id"))
    page = _undecoded(_feed_statement(scoped, unread_only, False, one_task, forward), raw)
    return _headed(counted, page, forward=forward)


@functools.cache
def _stream_statement(scoped: bool, raw: str | None = None) -> Any:
    active = select(func.count().label("token_active")).where(auth.token_active_where())
    page = _undecoded(_feed_statement(scoped, False, False, False, True), raw)
    return _headed(active, page, forward=True)


def _undecoded(page: Select[Any], dialect: str | None) -> Select[Any]:
    if dialect is None:
        return page
    return page.with_only_columns(*readable.raw_columns(NOTIFICATIONS.c, dialect))


async def mark_read(session: AsyncSession, notification_id: int, *, user_id: str | None) -> bool:
    """Mark one notification read; False when it does not exist (for this user)."""
    stmt = update(NOTIFICATIONS).where(N.id == notification_id)
    if user_id is not None:
        stmt = stmt.where(N.user_id == user_id)
    current = now_sql(dialect_of(session))
    result = await session.execute(
        stmt.values(is_read=True, read_at=func.coalesce(N.read_at, current)).returning(N.id)
    )
    return result.first() is not None


async def mark_all_read(
    session: AsyncSession, *, user_id: str | None, up_to_id: int | None = None
) -> int:
    """Mark every unread notification of the user read (with ``up_to_id``, only those up to
    that id: a client marks what it has shown, not what arrived since); returns how many."""
    unread = N.is_read == false()  # as the unread index's predicate reads (not IS false)
    scope = [unread]
    if user_id is not None:
        scope.append(N.user_id == user_id)
    if up_to_id is not None:
        scope.append(N.id <= up_to_id)
    current = now_sql(dialect_of(session))
    stmt = update(NOTIFICATIONS).values(is_read=True, read_at=current).returning(N.id)
    if dialect_of(session) == "postgresql":
        # Lock the rows in id order first, as retract_started locks the ones it deletes
        # (in the feed index's order, newest first, the two deadlocked), then update them
        # by primary key.
        stmt = stmt.where(locked_in_id_order(*scope), unread)
    else:  # one writer at a time
        stmt = stmt.where(*scope)
    result = await session.execute(stmt)
    return len(result.all())


async def count_read_before(
    session: AsyncSession, *, read_before: datetime, sparing: Any = None
) -> int:
    """How many notifications ``prune_read`` would delete; with ``sparing`` (a condition
    on ``pending_analysis``), not counting those whose task meets it (the tasks pruned
    first take their notifications with them)."""
    stmt = (
        select(func.count())
        .select_from(NOTIFICATIONS)
        .where(N.is_read.is_(True), N.read_at < read_before)
    )
    if sparing is not None:
        task = PendingAnalysis
        stmt = stmt.where(~select(task.id).where(task.id == N.task_id, sparing).exists())
    return int((await session.execute(stmt)).scalar_one())


async def prune_read(
    session: AsyncSession, *, read_before: datetime, batch_size: int = 1_000
) -> int:
    """Delete up to ``batch_size`` notifications read before ``read_before``."""
    doomed = select(N.id).where(N.is_read.is_(True), N.read_at < read_before).limit(batch_size)
    result = await session.execute(
        delete(NOTIFICATIONS).where(N.id.in_(doomed.scalar_subquery())).returning(N.id)
    )
    return len(result.all())
