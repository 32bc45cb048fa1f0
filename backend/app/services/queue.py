"""Every statement of the job life cycle, written once for SQLite and PostgreSQL.

Rules: each function takes the caller's session first and never commits, so a state
change and its notification share one commit. Every write a daemon makes about a job it
runs is fenced on (id, locked_by, attempts) and reports whether it applied: a daemon whose
lease expired and whose job was rescued and re-run can never overwrite the new run.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from operator import attrgetter
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Float,
    Integer,
    Interval,
    Select,
    String,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    delete,
    extract,
    false,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    true,
    tuple_,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.config import QUEUE_NAME_RULE, KeyLimit, RateLimit, is_queue_name
from app.db import (
    Database,
    Unindexed,
    UnindexedText,
    dialect_of,
    later_sql,
    now_sql,
    wake_daemons_at_commit,
)
from app.models import (
    FINISHED_STATUSES,
    NotificationType,
    PendingAnalysis,
    Processor,
    ProcessorState,
    QueueState,
    TaskStart,
    TaskStatus,
)
from app.models.types import JSONType, UTCDateTime, pg_array, utcnow
from app.services import faults, hotpath, notifications, readable
from app.services.notifications import TaskRef
from app.text import error_line

# Statements are SQLAlchemy Core over the tables (not ORM-enabled statements): the hot path
# skips the ORM's bulk-update bookkeeping. Reads that return models use the mapped classes.
TASKS: Table = PendingAnalysis.__table__  # type: ignore[assignment]
PROCESSORS: Table = Processor.__table__  # type: ignore[assignment]
QUEUE_STATES: Table = QueueState.__table__  # type: ignore[assignment]
STARTS: Table = TaskStart.__table__  # type: ignore[assignment]
T = TASKS.c
P = PROCESSORS.c
NOTIFY_CHANNEL = "async_processor_tasks"
#: The payload of a NOTIFY on NOTIFY_CHANNEL that asks the daemons to look at their jobs'
#: cancel flags now (any other payload, the empty one, says there is new work).
CANCEL_PAYLOAD = "cancel"
logger = logging.getLogger(__name__)
DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY = 5
MIN_PRIORITY, MAX_PRIORITY = 1, 10
DEFAULT_MAX_RETRIES = 3
DEFAULT_TIMEOUT_SECONDS = 600
MAX_NAME_LENGTH = 100
MAX_ID_LENGTH = 255
MAX_INT = 2**31 - 1  # max_retries and timeout_seconds are 32-bit integer columns
#: What the API and the CLI accept (the library takes up to MAX_INT).
USER_MAX_RETRIES = 1000
USER_MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
PRUNE_BATCH_SIZE = 1_000
LEASE_EXPIRED_ERROR = (
    "lease expired: the daemon running this attempt stopped renewing it "
    "(it died, hung or lost the database)"
)
_NO_ATTEMPTS_LEFT = "; no attempts left"
DAEMON_GONE_ERROR = (
    "daemon gone: the process running this attempt no longer exists "
    "(killed or crashed; seen by a daemon on the same machine)"
)

_PENDING_LITERAL: ColumnElement[str] = literal_column(f"'{TaskStatus.PENDING.value}'", String())
#: As a literal, so a read of running rows can go through the partial indexes over them.
_PROCESSING_LITERAL: ColumnElement[str] = literal_column(
    f"'{TaskStatus.PROCESSING.value}'", String()
)
#: The paused queues' names. Any value but false pauses (``IS NOT false``): SQLite keeps a
#: boolean as a number, and a hand-written ``paused = 2`` showed the queue paused (read back
#: as True) while ``paused IS 1`` let every daemon claim from it.
PAUSED_QUEUES = select(QUEUE_STATES.c.name).where(QUEUE_STATES.c.paused.is_not(False))
#: ``priority IN (10, 9, …, 1)``, every whole priority the table's CHECK allows, written out, for
#: SQLite (_due_in_order): its claim then searches each priority's due range of the pending
#: index (``priority = p AND scheduled_at <= now``) and stops at the first row not yet due,
#: in index order, no sort. Without it the schedule was a filter, not a bound, and a claim
#: that found fewer due rows than it asked for read every pending row scheduled for later,
#: whatever its priority: with 100,000 tasks scheduled for tomorrow each SQLite claim took
#: ~10-13 ms (~0.6 ms without them).
_DUE_PRIORITIES: ColumnElement[bool] = T.priority.in_(
    [literal_column(str(p), Integer()) for p in range(MAX_PRIORITY, MIN_PRIORITY - 1, -1)]
)


REF_COLUMNS = (T.id, T.kind, T.user_id, T.project_id, T.chapter_id, T.attempts)


#: A NUL character in JSON text: ``\u0000`` not preceded by an odd number of backslashes
#: (``\\u0000`` is the six characters \u0000 written as plain text, which is fine).
#: ``json.dumps(payload, allow_nan=False)``, without building an encoder for every call.
_PAYLOAD_JSON = json.JSONEncoder(allow_nan=False)
#: The same text from the C encoder built once (hotpath.json_encoder).
_PAYLOAD_C_ENCODER = hotpath.json_encoder(ensure_ascii=True)


def encode_payload(payload: object) -> str:
    """``json.dumps(payload, allow_nan=False)``, byte for byte (any JSON value: a payload,
    a handler's result); TypeError, ValueError or RecursionError when it cannot be
    encoded."""
    if _PAYLOAD_C_ENCODER is None:
        return _PAYLOAD_JSON.encode(payload)
    return "".join(_PAYLOAD_C_ENCODER(payload, 0))


_NUL_IN_JSON = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def payload_size(payload: object) -> int:
    """A payload's JSON text in UTF-8 bytes, compact (what ``MAX_PAYLOAD_BYTES`` limits: an
    "é" is 2 bytes, not its 6-character escape; a lone surrogate counts, and TaskSpec
    refuses it)."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return len(text.encode("utf-8", "surrogatepass"))


def has_nul(value: object) -> bool:
    """Whether a JSON value holds a NUL character in any string or key (PostgreSQL's text
    and jsonb cannot store one)."""
    return _NUL_IN_JSON.search(json.dumps(value)) is not None


def is_unicode(value: object) -> bool:
    """Whether every string and key in a JSON value is valid Unicode text: no lone
    surrogate (``"\\ud800"`` in JSON), which UTF-8 cannot encode, PostgreSQL's json
    refuses, and a response could not be written from."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: How deeply a payload or a result may nest (objects and arrays). Responses that show
#: them are serialised with a depth limit of their own (pydantic's, 255 with the
#: response's own levels), and no real payload comes near this.
MAX_JSON_DEPTH = 100


def nests_deeper_than(value: object, limit: int, text: str | None = None) -> bool:
    """Whether a JSON value has more than ``limit`` levels of objects and arrays. With its
    JSON ``text``, the walk is skipped when the text holds too few brackets to nest so
    deep (the common case: one C-speed count)."""
    if text is not None and text.count("{") + text.count("[") <= limit:
        return False
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


_SCALARS = frozenset({str, int, float, bool, type(None)})
_STR = frozenset({str})


def keys_are_strings(value: object, text: str) -> bool:
    """Whether every object key in a JSON value is a string. json.dumps writes an int,
    float, bool or None key as a string ({1: "a"} → {"1": "a"}; {True: 1, "true": 2} keeps
    one of them): the payload stored would not be the one given. With its JSON ``text``,
    only the top object's keys are looked at when the text has no other object in it; else
    each container's keys and values are typed at C speed (set.issuperset over map(type))
    and only nested containers are walked."""
    if text.count("{") <= 1:
        return not isinstance(value, dict) or all(isinstance(k, str) for k in value)
    stack: list[object] = [value]
    while stack:
        item = stack.pop()
        values: Iterable[object]
        if isinstance(item, dict):
            if not _STR.issuperset(map(type, item)) and not all(isinstance(k, str) for k in item):
                return False
            values = item.values()
        elif isinstance(item, list | tuple):
            values = item
        else:
            continue
        if not _SCALARS.issuperset(map(type, values)):
            stack.extend(v for v in values if isinstance(v, dict | list | tuple))
    return True


class InvalidTaskError(ValueError):
    """A task spec that can never be valid (bad priority, timeout, names …)."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What to enqueue. Validated on construction, when the payload is also encoded; the
    bulk inserts and the one-row enqueue alone store that text (``payload_json``). A
    payload changed after its spec was made is not validated again, and whether the change
    is stored depends on the path: make a new spec instead."""

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
    #: The payload as JSON text, encoded once by the validation and reused by the bulk
    #: inserts: what is stored is the payload as it was validated.
    payload_json: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The common case in one expression; any doubt takes the checks that say what is
        # wrong (_explain). Bulk enqueues validate every row: this is per-row cost.
        kind, queue, user, project, chapter, key = (
            self.kind,
            self.queue,
            self.user_id,
            self.project_id,
            self.chapter_id,
            self.idempotency_key,
        )
        text = None
        if (
            type(kind) is str
            and type(queue) is str
            and type(self.payload) is dict
            and type(self.priority) is int
            and type(self.max_retries) is int
            and type(self.timeout_seconds) is int
            and 0 < len(kind) <= MAX_NAME_LENGTH
            and is_queue_name(queue)
            and MIN_PRIORITY <= self.priority <= MAX_PRIORITY
            and 0 <= self.max_retries <= MAX_INT
            and 0 < self.timeout_seconds <= MAX_INT
            and (user is None or (type(user) is str and 0 < len(user) <= MAX_ID_LENGTH))
            and (project is None or (type(project) is str and 0 < len(project) <= MAX_ID_LENGTH))
            and (chapter is None or (type(chapter) is str and 0 < len(chapter) <= MAX_ID_LENGTH))
            and (key is None or (type(key) is str and 0 < len(key) <= MAX_ID_LENGTH))
            and "\x00" not in kind
            and (user is None or "\x00" not in user)
            and (project is None or "\x00" not in project)
            and (chapter is None or "\x00" not in chapter)
            and (key is None or "\x00" not in key)
        ):
            try:
                text = encode_payload(self.payload)
            except (TypeError, ValueError, RecursionError):
                text = None
        if (
            text is None
            or ("u0000" in text and _NUL_IN_JSON.search(text))
            or nests_deeper_than(self.payload, MAX_JSON_DEPTH, text)
            or not keys_are_strings(self.payload, text)
            or ("\\ud" in text and not is_unicode(self.payload))
            or not all(
                s.isascii() or is_unicode(s)
                for s in (kind, queue, user, project, chapter, key)
                if s
            )
        ):
            text = self._explain()  # raises, unless only a type was unusual (a dict subclass)
        if self.scheduled_at is not None:
            _check_schedule(self.scheduled_at)
        object.__setattr__(self, "payload_json", text)

    def _explain(self) -> str:
        """Every check, each with its own message: raises InvalidTaskError where one fails;
        the payload's JSON text where none does."""
        _check(
            isinstance(self.kind, str) and 0 < len(self.kind) <= MAX_NAME_LENGTH, "kind", self.kind
        )
        check_queue_name(self.queue)
        _check(isinstance(self.payload, dict), "payload", "must be a JSON object")
        for name, low, high in (
            ("priority", MIN_PRIORITY, MAX_PRIORITY),
            ("max_retries", 0, MAX_INT),
            ("timeout_seconds", 1, MAX_INT),
        ):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            _check(ok, name, value)
        for name in ("user_id", "project_id", "chapter_id", "idempotency_key"):
            value = getattr(self, name)
            ok = value is None or (isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH)
            _check(ok, name, value)
        try:
            text = _PAYLOAD_JSON.encode(self.payload)
        except (TypeError, ValueError) as exc:
            raise InvalidTaskError(f"payload is not JSON-serialisable: {exc}") from None
        # PostgreSQL stores neither NUL characters in text nor \u0000 in jsonb.
        strings = [self.kind, self.queue, self.user_id, self.project_id, self.chapter_id]
        if _NUL_IN_JSON.search(text) or any(
            "\x00" in s for s in [*strings, self.idempotency_key] if s
        ):
            raise InvalidTaskError("strings must not contain NUL (\\u0000) characters")
        if not is_unicode([self.payload, *strings, self.idempotency_key]):
            raise InvalidTaskError(
                "strings must be valid Unicode: a lone surrogate (\\ud800-\\udfff) cannot be stored"
            )
        if nests_deeper_than(self.payload, MAX_JSON_DEPTH, text):
            raise InvalidTaskError(
                f"payload nests objects and arrays more than {MAX_JSON_DEPTH} levels deep"
            )
        if not keys_are_strings(self.payload, text):
            raise InvalidTaskError(
                "payload keys must be strings: JSON would turn a number, bool or None key"
                " into one (and {True: 1, 'true': 2} into a single key)"
            )
        return text

    def row(self) -> dict[str, Any]:
        """Insert parameters for this spec (``sched`` feeds the scheduled_at default)."""
        return {
            "kind": self.kind,
            "payload": self.payload,
            "priority": self.priority,
            "queue": self.queue,
            "max_retries": self.max_retries,
            "timeout_seconds": self.timeout_seconds,
            "sched": self.scheduled_at,
            "user_id": self.user_id,
            "project_id": self.project_id,
            "chapter_id": self.chapter_id,
            "idempotency_key": self.idempotency_key,
        }


def _check_schedule(when: object) -> None:
    """A time the columns can hold: a datetime whose UTC instant exists (0001-01-01 at
    +14:00 does not: Python cannot represent it), with an offset or naive (read as UTC)."""
    if not isinstance(when, datetime):
        raise InvalidTaskError(f"invalid scheduled_at: {when!r} is not a datetime")
    try:
        (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidTaskError(
            f"invalid scheduled_at: {when.isoformat()} is outside the range of dates in UTC"
        ) from None


def check_queue_name(name: object) -> None:
    """InvalidTaskError unless ``name`` can be a queue's name (config.QUEUE_NAME_RULE)."""
    if not (isinstance(name, str) and is_queue_name(name)):
        raise InvalidTaskError(f"invalid queue: {name!r} (a queue's name: {QUEUE_NAME_RULE})")


def _check(ok: bool, name: str, value: object) -> None:
    if not ok:
        raise InvalidTaskError(f"invalid {name}: {value!r}")


@dataclass(frozen=True, slots=True)
class EnqueuedTask:
    """An enqueue's answer: the task id, and False when an idempotency key matched."""

    id: int
    created: bool


def _read_payload(text: Any) -> tuple[Any, str | None]:
    """A claimed row's payload from its JSON text, and why it could not be read (None when
    it could). Only a hand-edited row holds text that is not JSON, or nests too deep."""
    if not isinstance(text, str):  # a driver that decoded it anyway
        return text, None
    try:
        return json.loads(text), None
    except (ValueError, RecursionError) as exc:
        return {}, f"the payload stored in this row is not readable JSON: {error_line(exc)}"


_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)


def _read_schedule(value: Any) -> datetime:
    """A claimed row's scheduled_at, for ordering the claimed jobs only: seconds since the
    epoch (PostgreSQL) or SQLite's text. A value no datetime can hold (a hand-edited row)
    orders first or last; it never fails the claim."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    try:
        if isinstance(value, str):
            found = datetime.fromisoformat(value)
            return found if found.tzinfo is not None else found.replace(tzinfo=UTC)
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        if isinstance(value, int | float) and value > 0:
            return _LATEST
        return _EARLIEST


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
    #: Why this row's values could not be read (its payload): the job fails for good
    #: without running; None for every row the queue's own writes made.
    unreadable: str | None = None
    #: A cancel was requested before the claim (a pending row flagged by hand: the queue's
    #: own cancel ends a pending task at once): the job is cancelled without running.
    cancel_requested: bool = False

    @classmethod
    def from_row(cls, row: Any) -> ClaimedTask:
        """Build from a claim's RETURNING row (payload as JSON text; scheduled_at as text
        or seconds since the epoch, see _claimed_schedule)."""
        payload, unreadable = _read_payload(row.payload)
        return cls(
            id=row.id,
            kind=row.kind,
            queue=row.queue,
            payload=payload,
            priority=row.priority,
            attempt=row.attempts,
            retry_count=row.retry_count,
            max_retries=row.max_retries,
            timeout_seconds=row.timeout_seconds,
            user_id=row.user_id,
            project_id=row.project_id,
            chapter_id=row.chapter_id,
            scheduled_at=_read_schedule(row.scheduled_at),
            unreadable=unreadable,
            cancel_requested=bool(row.cancel_requested),
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
    CANCELLED = "cancelled"


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
    #: those of the above whose daemon was gone (the rest: their leases expired)
    gone: tuple[int, ...] = ()


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
    """Insert many pending tasks in the caller's transaction; results in the input order.
    All or none: a spec that fails validation raises InvalidTaskError with none of the
    call's rows inserted."""
    if len(specs) > PIPELINE_ROWS and dialect_of(session) == "postgresql":
        results = await _enqueue_pipelined(session, specs, now)
    else:
        items = [s if isinstance(s, TaskSpec) else TaskSpec(**s) for s in specs]
        if not items:
            return []
        keyed = [i for i, s in enumerate(items) if s.idempotency_key is not None]
        if keyed:
            results = await _enqueue_keyed_too(session, items, keyed, now)
        else:  # the common call: every row new, ids in input order
            results = [
                EnqueuedTask(task_id, True) for task_id in await _insert_plain(session, items, now)
            ]
    if dialect_of(session) == "sqlite":
        wake_daemons_at_commit(session)  # PostgreSQL: the insert trigger's NOTIFY
    return results


#: A bulk enqueue of more rows than this goes in chunks of this many on PostgreSQL
#: (_enqueue_pipelined). Not on SQLite: its inserts run on aiosqlite's thread, which
#: needs the GIL the validation holds, and each chunk adds trips to that thread; measured
#: slower there (session 22).
PIPELINE_ROWS = 250


async def _enqueue_pipelined(
    session: AsyncSession, specs: Sequence[TaskSpec | Mapping[str, Any]], now: datetime | None
) -> list[EnqueuedTask]:
    """PostgreSQL, many rows, in chunks of PIPELINE_ROWS: each chunk is validated and its
    statement's parameters encoded on the event loop while the server inserts the chunk
    before it, in its own process, so the two costs overlap instead of adding up (one
    statement for 1,000 rows spends about half its time on each side). Rows with
    idempotency keys go last, in one statement, as in
    _enqueue_keyed_too. A savepoint keeps the call all or none: a spec that fails
    validation, or a failed insert, undoes the chunks already inserted and leaves the
    caller's transaction as it was."""
    items: list[TaskSpec] = []
    made: dict[int, EnqueuedTask] = {}
    keyed: list[int] = []
    async with session.begin_nested():
        await session.connection()  # SAVEPOINT now: hotpath's statements bypass the session
        flight: asyncio.Task[list[int]] | None = None
        flight_at: list[int] = []
        try:
            for start in range(0, len(specs), PIPELINE_ROWS):
                chunk = [
                    s if isinstance(s, TaskSpec) else TaskSpec(**s)
                    for s in specs[start : start + PIPELINE_ROWS]
                ]
                items.extend(chunk)
                at = [i for i, s in enumerate(chunk, start) if s.idempotency_key is None]
                keyed.extend(i for i, s in enumerate(chunk, start) if s.idempotency_key is not None)
                send = _plain_insert(session, [items[i] for i in at], now) if at else None
                if flight is not None:
                    made.update(_created(flight_at, await flight))
                    flight = None
                if send is not None:
                    flight, flight_at = asyncio.ensure_future(send()), at
                    await asyncio.sleep(0)  # it sends before the next chunk's validation
            if flight is not None:
                made.update(_created(flight_at, await flight))
                flight = None
        finally:
            if flight is not None:  # an invalid spec, or cancelled: the statement in
                await asyncio.gather(flight, return_exceptions=True)  # flight settles first
        if keyed:
            by_key = await _insert_keyed(session, [items[i] for i in keyed], now)
            made.update(_keyed_results(items, keyed, by_key))
    return [made[i] for i in range(len(items))]


def _created(positions: list[int], ids: list[int]) -> dict[int, EnqueuedTask]:
    return {i: EnqueuedTask(task_id, True) for i, task_id in zip(positions, ids, strict=True)}


async def enqueue_task_alone(
    db: Database, *, now: datetime | None = None, **spec: Any
) -> EnqueuedTask:
    """``enqueue_task`` as a transaction of its own, committed when it returns: for a
    caller with no transaction to share (a script, a request that writes nothing else).
    The daemons are woken as by any enqueue."""
    [result] = await enqueue_tasks_alone(db, [TaskSpec(**spec)], now=now)
    return result


async def enqueue_tasks_alone(
    db: Database,
    specs: Sequence[TaskSpec | Mapping[str, Any]],
    *,
    now: datetime | None = None,
) -> list[EnqueuedTask]:
    """``enqueue_tasks`` as ONE transaction of its own (all or none), committed when it
    returns; results in the input order.

    Without a session to share it takes the shortest way there is: on PostgreSQL with
    asyncpg one autocommitted statement (one round trip, where BEGIN, INSERT, COMMIT take
    three); on a SQLite file, one plain enqueue runs on a bare ``sqlite3`` connection on
    this thread, inside BEGIN IMMEDIATE … COMMIT, when the write lock is free at once (no
    thread hand-off, no session), and waits the usual way when another connection holds
    it. Rows with idempotency keys, other drivers and the hot path turned off
    (hotpath.ENABLED) take an ordinary write transaction."""
    items = [s if isinstance(s, TaskSpec) else TaskSpec(**s) for s in specs]
    if not items:
        return []
    if any(s.idempotency_key is not None for s in items):
        return await db.run_write(partial(enqueue_tasks, specs=items, now=now))
    if db.dialect == "postgresql":
        ids = await _insert_plain_alone(db, items, now)
        if ids is None:  # not asyncpg
            return await db.run_write(partial(enqueue_tasks, specs=items, now=now))
    else:
        here = None
        if len(items) == 1 and _small(items[0]):
            here = partial(_insert_one_sqlite3, spec=items[0], now=now)
        ids = await db.run_write(partial(_insert_plain, specs=items, now=now), here=here)
        db.wake_daemons()
    return [EnqueuedTask(task_id, True) for task_id in ids]


async def enqueue_task_alone_row(
    db: Database, spec: TaskSpec, *, now: datetime | None = None
) -> Any | None:
    """``enqueue_task_alone`` for a spec without an idempotency key, answering the whole new
    row (every column of the task, as a named tuple) from the INSERT itself: for a caller
    that shows the task it made (POST /tasks) without a second transaction to read it back,
    whose failure would report an error for a job that exists. None where this way does
    not apply (a key, another driver, the hot path off): the caller enqueues and reads in
    one transaction instead."""
    if spec.idempotency_key is not None or not hotpath.ENABLED:
        return None
    pinned = now is not None
    statement = _insert_returning_all(db.dialect, pinned)
    binder = _spec_args(statement, db.engine.dialect)
    if db.dialect == "postgresql":
        if binder is not None:
            sql, args = binder.sql, binder.args(spec, now)
            rows = await hotpath.fetch_autocommit_pooled_bound(
                db.engine, binder.prepared, sql, args
            )
        else:
            [params] = _with_clock([spec.row()], now)
            rows = await hotpath.fetch_autocommit_pooled(db.engine, statement, params)
        return None if rows is None else rows[0]

    def on_the_loop(conn: sqlite3.Connection, dialect: Dialect) -> list[Any]:
        if binder is None:
            [params] = _with_clock([spec.row()], now)
            return hotpath.sqlite3_fetch(conn, dialect, statement, params)
        raw = hotpath.sqlite3_fetch_raw(conn, dialect, binder.sql, binder.args(spec, now))
        return binder.prepared.rows(raw)

    async def usual(session: AsyncSession) -> list[Any]:
        [params] = _with_clock([spec.row()], now)
        return await hotpath.fetch(session, statement, params)

    [row] = await db.run_write(usual, here=on_the_loop if _small(spec) else None)
    db.wake_daemons()
    return row


@functools.cache
def _insert_returning_all(dialect: str, pinned: bool) -> Any:
    return insert(TASKS).values(**_insert_values(dialect, pinned)).returning(*TASKS.c)


async def _insert_plain_alone(
    db: Database, specs: list[TaskSpec], now: datetime | None
) -> list[int] | None:
    """PostgreSQL: _insert_plain as one autocommitted statement (None: not possible here)."""
    if not hotpath.ENABLED:
        return None
    pinned = now is not None
    if len(specs) == 1:
        statement = _insert_statement("postgresql", pinned)
        binder = _spec_args(statement, db.engine.dialect)
        if binder is not None:
            sql, args = binder.sql, binder.args(specs[0], now)
            rows = await hotpath.fetch_autocommit_pooled_bound(
                db.engine, binder.prepared, sql, args
            )
            return None if rows is None else [rows[0].id]
    if len(specs) == 1:
        [bound] = _with_clock([specs[0].row()], now)
        statement = _insert_statement("postgresql", pinned)
    else:
        if len(_pg_parts(specs)) > 1:  # more than one statement: a transaction, as usual
            return None
        statement, bound = _pg_bulk_insert_statement(pinned), _pg_bulk_params(specs, now)
    rows = await hotpath.fetch_autocommit_pooled(db.engine, statement, bound)
    return None if rows is None else sorted(row.id for row in rows)


#: SQLite: a payload larger than this is written the usual way (on a driver thread), not
#: on the bare connection on the event loop, where writing a megabyte would hold the loop
#: for milliseconds.
HERE_MAX_PAYLOAD_CHARS = 64 * 1024


def _small(spec: TaskSpec) -> bool:
    return len(spec.payload_json) <= HERE_MAX_PAYLOAD_CHARS


def _insert_one_sqlite3(
    conn: sqlite3.Connection, dialect: Dialect, *, spec: TaskSpec, now: datetime | None
) -> list[int]:
    """SQLite: one plain enqueue on a bare connection, in the caller's transaction."""
    statement = _insert_statement("sqlite", now is not None)
    binder = _spec_args(statement, dialect)
    if binder is None:
        [params] = _with_clock([spec.row()], now)
        return [row.id for row in hotpath.sqlite3_fetch(conn, dialect, statement, params)]
    return [
        row[0]
        for row in hotpath.sqlite3_fetch_raw(conn, dialect, binder.sql, binder.args(spec, now))
    ]


async def _enqueue_keyed_too(
    session: AsyncSession, items: list[TaskSpec], keyed: list[int], now: datetime | None
) -> list[EnqueuedTask]:
    """Rows with idempotency keys (``keyed``: their positions) among plain ones."""
    results: dict[int, EnqueuedTask] = {}
    plain = [i for i, s in enumerate(items) if s.idempotency_key is None]
    if plain:
        results.update(
            _created(plain, await _insert_plain(session, [items[i] for i in plain], now))
        )
    by_key = await _insert_keyed(session, [items[i] for i in keyed], now)
    results.update(_keyed_results(items, keyed, by_key))
    return [results[i] for i in range(len(items))]


def _keyed_results(
    items: list[TaskSpec], keyed: list[int], by_key: Mapping[str, EnqueuedTask]
) -> dict[int, EnqueuedTask]:
    """Each keyed position's task; a key repeated in one call: its later items get the
    first one's task, not created."""
    results: dict[int, EnqueuedTask] = {}
    seen: set[str] = set()
    for i in keyed:
        key = items[i].idempotency_key or ""
        found = by_key[key]
        results[i] = found if key not in seen else EnqueuedTask(found.id, False)
        seen.add(key)
    return results


async def held_by_others(
    session: AsyncSession, specs: Sequence[TaskSpec], results: Sequence[EnqueuedTask]
) -> list[int]:
    """Positions of ``specs`` whose idempotency key matched a task of another user (what the
    API answers 409 for): an enqueue's answer there would be someone else's task."""
    existing = {r.id for r in results if not r.created}
    if not existing:
        return []
    owners = dict(
        (await session.execute(select(T.id, T.user_id).where(T.id.in_(existing)))).tuples().all()
    )
    return [
        i
        for i, (spec, r) in enumerate(zip(specs, results, strict=True))
        if not r.created and owners.get(r.id) != spec.user_id
    ]


def _enqueue_clock(dialect: str, pinned: bool, name: str) -> ColumnElement[datetime]:
    """The enqueue time: PostgreSQL's now() unless the caller pinned one. A host-side time
    is a per-row parameter (one name per use), not a literal and not a repeated name:
    several rows go out as one multi-VALUES statement, and either of those breaks its
    parameter count on asyncpg."""
    if dialect == "postgresql" and not pinned:
        return func.now()
    return bindparam(name, type_=UTCDateTime())


def _insert_values(
    dialect: str, pinned: bool, sched: ColumnElement[Any] | None = None
) -> dict[str, Any]:
    """The enqueue's computed columns; ``sched`` is where the requested time comes from
    (a parameter by default)."""
    requested = bindparam("sched", type_=UTCDateTime()) if sched is None else sched
    return {
        "scheduled_at": func.coalesce(requested, _enqueue_clock(dialect, pinned, "enq_sched_now")),
        "created_at": _enqueue_clock(dialect, pinned, "enq_created"),
        "updated_at": _enqueue_clock(dialect, pinned, "enq_updated"),
        # Constants are written into the SQL, not bound: no parameter to process per row.
        "status": _PENDING_LITERAL,
        "retry_count": _ZERO,
        "attempts": _ZERO,
        "token_usage": _ZERO,
        "cancel_requested": false(),
    }


_ZERO: ColumnElement[int] = literal_column("0", Integer())


async def _insert_plain(
    session: AsyncSession, specs: list[TaskSpec], now: datetime | None
) -> list[int]:
    """Rows without idempotency keys: their new ids, in input order."""
    return await _plain_insert(session, specs, now)()


def _plain_insert(
    session: AsyncSession, specs: list[TaskSpec], now: datetime | None
) -> Callable[[], Awaitable[list[int]]]:
    """_insert_plain in two steps: the statement's parameters are made now, on this thread
    (the Python side of the work), and sent when the function returned is called."""
    dialect = dialect_of(session)
    pinned = now is not None
    if len(specs) > 1 and dialect == "sqlite" and SQLITE_JSON_ARROWS:
        documents = list(_sqlite_bulk_params(session.get_bind().dialect, specs, now))
        return partial(_send_sqlite_bulk, session, documents, len(specs))
    if len(specs) > 1 and dialect == "postgresql":
        # ONE statement whatever the count: the rows travel as one JSON document. Each
        # row draws its id from the sequence in document order (the SELECT orders by it),
        # so the new ids sorted are the rows in input order (other sessions' ids may
        # interleave, never reorder them).
        documents = [_pg_bulk_params(part, now) for part in _pg_parts(specs)]
        return partial(_send_pg_bulk, session, pinned, documents)
    params = _with_clock([s.row() for s in specs], now)
    if len(params) == 1:  # the common enqueue: one row, on the bare driver
        return partial(_send_one, session, _insert_statement(dialect, pinned), params[0])
    # SQLite before 3.38 (no ->> operator for _sqlite_bulk_insert_statement): one
    # executemany of the one-row INSERT, ids as there.
    return partial(_send_many, session, _insert_statement(dialect, pinned, returning=False), params)


async def _send_one(session: AsyncSession, statement: Any, params: dict[str, Any]) -> list[int]:
    return [row.id for row in await hotpath.fetch(session, statement, params)]


async def _send_many(
    session: AsyncSession, statement: Any, params: list[dict[str, Any]]
) -> list[int]:
    await hotpath.execute_many(session, statement, params)
    return await _last_ids(session, len(params))


async def _send_pg_bulk(
    session: AsyncSession, pinned: bool, documents: list[dict[str, Any]]
) -> list[int]:
    ids: list[int] = []
    for params in documents:  # one after another: each one's ids above the last's
        found = await hotpath.fetch(session, _pg_bulk_insert_statement(pinned), params)
        ids += sorted(row.id for row in found)
    return ids


#: One PostgreSQL bulk document's payload text before another statement starts: jsonb
#: refuses an array past 256 MB, and a payload of small numbers takes ~6x its text there.
PG_DOCUMENT_BYTES = 32 * 1024 * 1024


def _pg_parts(specs: Sequence[TaskSpec]) -> list[Sequence[TaskSpec]]:
    """``specs`` cut where their payload text passes PG_DOCUMENT_BYTES (one part, almost
    always)."""
    parts: list[Sequence[TaskSpec]] = []
    start = size = 0
    for i, spec in enumerate(specs):
        size += len(spec.payload_json)
        if size >= PG_DOCUMENT_BYTES:
            parts.append(specs[start : i + 1])
            start, size = i + 1, 0
    if start < len(specs):
        parts.append(specs[start:])
    return parts


async def _send_sqlite_bulk(
    session: AsyncSession, documents: list[dict[str, Any]], count: int
) -> list[int]:
    """SQLite: the rows travel as JSON documents (arrays of arrays) and ONE INSERT …
    SELECT FROM json_each(document) ORDER BY the position inserts each document's rows
    (an executemany steps the one-row INSERT once per row, ~1.6x slower, with each row's
    parameters processed in Python)."""
    statement = _sqlite_bulk_insert_statement()
    for params in documents:
        await hotpath.fetch(session, statement, params)
    return await _last_ids(session, count)


def _sqlite_bulk_params(
    dialect: Dialect, specs: list[TaskSpec], now: datetime | None
) -> Iterator[dict[str, Any]]:
    clocks = dict.fromkeys(_CLOCKS, now or utcnow())
    payload, when = _sqlite_binders(dialect)
    for document in _sqlite_documents(specs, payload, when):
        yield {**clocks, "b_rows": document}


async def _last_ids(session: AsyncSession, count: int) -> list[int]:
    """SQLite: the ids of the ``count`` rows this transaction just inserted. It holds the
    database's only write lock and the table is AUTOINCREMENT (a new rowid is one more than
    the largest ever given), so the rows took consecutive ids, in order, ending at
    last_insert_rowid()."""
    [(last,)] = await hotpath.fetch(session, _LAST_ROWID, {})
    return list(range(last - count + 1, last + 1))


_LAST_ROWID = select(func.last_insert_rowid())

#: SQLite 3.38 brought the ``->>`` operator the bulk INSERT reads its document with.
SQLITE_JSON_ARROWS = sqlite3.sqlite_version_info >= (3, 38, 0)

#: One bulk document's payload text before another statement starts (SQLite's limit on a
#: value is 1,000,000,000 bytes; the API's bulk request may carry 1,000 payloads of 1 MB).
SQLITE_DOCUMENT_BYTES = 16 * 1024 * 1024


@functools.cache
def _sqlite_bulk_insert_statement() -> Any:
    """SQLite: many plain enqueues in ONE INSERT … SELECT FROM json_each(document), each
    row an array of the ``_BULK_COLUMNS`` values (as their types bind them), in order."""
    rows = func.json_each(bindparam("b_rows", type_=Text())).table_valued("key", "value")
    doc = rows.alias("b")
    fields = {
        name: doc.c.value.op("->>")(literal_column(str(i))) for i, name in enumerate(_BULK_COLUMNS)
    }
    columns: dict[str, Any] = {c: fields[c] for c in _BULK_COLUMNS if c != "sched"}
    columns.update(_insert_values("sqlite", True, sched=fields["sched"]))
    pick = select(*(expr.label(name) for name, expr in columns.items())).order_by(doc.c.key)
    return insert(TASKS).from_select(list(columns), pick)


@functools.lru_cache(maxsize=32)  # per engine's dialect: bounded, tests make hundreds
def _sqlite_binders(
    dialect: Dialect,
) -> tuple[Callable[[TaskSpec], str], Callable[[datetime], Any]]:
    """A spec's payload and a schedule as SQLite stores them: the column types' own bind
    processing (JSON text; UTCDateTime's text). With the default JSON serializer
    (json.dumps, which TaskSpec's validation encodes with) the payload is the text that
    validation made: no second encoding."""
    bind = T.payload.type.dialect_impl(dialect).bind_processor(dialect)
    when = T.scheduled_at.type.dialect_impl(dialect).bind_processor(dialect)
    if bind is None or when is None:
        raise TypeError(f"{dialect.name}: the payload and time columns bind through Python")
    if getattr(dialect, "_json_serializer", None) is None:
        return _validated_text, when
    payload = bind
    return lambda spec: payload(spec.payload), when


def _validated_text(spec: TaskSpec) -> str:
    return spec.payload_json


def _sqlite_documents(
    specs: Sequence[TaskSpec], payload: Callable[[TaskSpec], str], when: Callable[[datetime], Any]
) -> Iterator[str]:
    """The rows of _sqlite_bulk_insert_statement as JSON documents, with at most about
    SQLITE_DOCUMENT_BYTES of payload each. ``ensure_ascii=False``: text stays UTF-8, and a
    string no UTF-8 can hold (a lone surrogate) fails the insert as the one-row INSERT
    does, never stored mangled."""
    chunk: list[list[Any]] = []
    size = 0
    for s in specs:
        text = payload(s)
        chunk.append(
            [
                s.kind,
                s.queue,
                s.priority,
                text,
                s.max_retries,
                s.timeout_seconds,
                None if s.scheduled_at is None else when(s.scheduled_at),
                s.user_id,
                s.project_id,
                s.chapter_id,
            ]
        )
        size += len(text)
        if size >= SQLITE_DOCUMENT_BYTES:
            yield json.dumps(chunk, ensure_ascii=False)
            chunk, size = [], 0
    if chunk:
        yield json.dumps(chunk, ensure_ascii=False)


@functools.cache
def _insert_statement(dialect: str, pinned: bool, returning: bool = True) -> Any:
    """The plain enqueue INSERT of one row, built once per shape (``pinned``: a caller's
    clock)."""
    stmt = insert(TASKS).values(**_insert_values(dialect, pinned))
    return stmt.returning(T.id) if returning else stmt


class _SpecArgs:
    """The positional arguments of a one-row enqueue INSERT (``_insert_statement``,
    ``_insert_returning_all``) made straight from a validated TaskSpec: its fields in the
    statement's order with one C call, the payload as the JSON text validation made (what
    the JSON type's bind makes of it with the default serializer: no second encoding), and
    the clock processed once for its three uses (what is stored is the payload as it was
    validated, as the bulk inserts store it). ``Prepared.bind`` got there through two
    dicts and a processor per position, ~20 µs of an enqueue's ~150 µs on a SQLite file
    under load. Built once per statement and dialect (``_spec_args``)."""

    def __init__(self, statement: Any, dialect: Dialect) -> None:
        self.prepared = hotpath.prepared(statement, dialect, _ROW_KEYS)
        self.sql, positions = self.prepared.positions()
        names = [name for name, _ in positions]
        fields = [n for n in names if n in _SPEC_FIELDS]
        clocks = names[len(fields) + 1 :]
        # The order SQLAlchemy compiles the VALUES in: the spec's columns, then the
        # schedule, then the host clocks (none on PostgreSQL's now()).
        if (
            len(names) <= len(fields)
            or names[: len(fields)] != fields
            or names[len(fields)] != "sched"
            or any(c not in _CLOCKS for c in clocks)
        ):
            raise TypeError(f"unexpected parameter order for the one-row enqueue: {names}")
        procs = dict(positions)
        if (
            any(procs[n] is not None for n in fields if n != "payload")
            or procs.get("payload") is None
        ):
            raise TypeError(f"{dialect.name}: a spec column binds through Python")
        when = procs["sched"]
        if when is None:
            raise TypeError(f"{dialect.name}: the time columns bind through Python")
        self._fields = attrgetter(*(_SPEC_FIELDS[n] for n in fields))
        self._when = when
        self._clocks = len(clocks)

    def args(self, spec: TaskSpec, now: datetime | None) -> list[Any]:
        sched = spec.scheduled_at
        out = [*self._fields(spec), None if sched is None else self._when(sched)]
        if self._clocks:
            out += [self._when(now or utcnow())] * self._clocks
        return out


#: TaskSpec's attribute for each of the one-row INSERT's spec parameters.
_SPEC_FIELDS = {
    "kind": "kind",
    "queue": "queue",
    "priority": "priority",
    "payload": "payload_json",
    "max_retries": "max_retries",
    "timeout_seconds": "timeout_seconds",
    "user_id": "user_id",
    "project_id": "project_id",
    "chapter_id": "chapter_id",
    "idempotency_key": "idempotency_key",
}


def _spec_args(statement: Any, dialect: Dialect) -> _SpecArgs | None:
    """The statement's _SpecArgs, or None where the payload's text is not what this
    dialect stores (an engine's own json_serializer) or the statement is not as _SpecArgs
    expects (another driver's bind processing, another SQLAlchemy's parameter order): the
    caller binds the usual way."""
    if getattr(dialect, "_json_serializer", None) is not None:
        return None
    key = (id(statement), hotpath.flavor(dialect))
    found = _SPEC_ARGS.get(key)
    if found is None or found[0] is not statement:
        try:
            binder: _SpecArgs | None = _SpecArgs(statement, dialect)
        except TypeError as error:
            logger.warning("one-row enqueues bind the usual way: %s", error)
            binder = None
        found = _SPEC_ARGS[key] = (statement, binder)
    return found[1]


_SPEC_ARGS: dict[tuple[int, tuple[Any, ...]], tuple[Any, _SpecArgs | None]] = {}


#: The plain enqueue's columns (TaskSpec.row() without the idempotency key): the values of
#: a row in SQLite's bulk document, in order.
_BULK_COLUMNS = (
    "kind",
    "queue",
    "priority",
    "payload",
    "max_retries",
    "timeout_seconds",
    "sched",
    "user_id",
    "project_id",
    "chapter_id",
)


def _pg_bulk_params(specs: Sequence[TaskSpec], now: datetime | None) -> dict[str, Any]:
    """The parameters of _pg_bulk_insert_statement: the rows as ONE JSON document, an
    array of arrays of _PG_DOCUMENT_COLUMNS, each row ending with its payload as the JSON
    text validation made, spliced in (not encoded again, and not a string to be parsed
    twice). One text parameter: no per-value encoding in the driver, so the whole Python
    side of a bulk enqueue happens before the statement is sent."""
    encode = _DOCUMENT_ENCODER
    rows = []
    for s in specs:
        when = None if s.scheduled_at is None else _utc(s.scheduled_at).isoformat()
        head = encode(
            [
                s.kind,
                s.queue,
                s.priority,
                s.max_retries,
                s.timeout_seconds,
                when,
                s.user_id,
                s.project_id,
                s.chapter_id,
            ]
        )
        rows.append(f"{head[:-1]},{s.payload_json}]")
    return {**dict.fromkeys(_CLOCKS, now or utcnow()), "b_rows": f"[{','.join(rows)}]"}


#: Strings stay UTF-8 (validation refused any that UTF-8 cannot hold).
_DOCUMENT_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: The values of a row in _pg_bulk_params's document, in order (as it writes them); the
#: payload follows.
_PG_DOCUMENT_COLUMNS = tuple(c for c in _BULK_COLUMNS if c != "payload")


def _seconds_text(seconds: float) -> str:
    """A delay as a person reads it: tenths under ten seconds (0.8, not 1), whole above."""
    tenths = round(seconds, 1)
    return f"{tenths:.1f}" if tenths < 10 else f"{seconds:.0f}"


def _utc(when: datetime) -> datetime:
    """A schedule as UTCDateTime binds it: naive is read as UTC."""
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).astimezone(UTC)


@functools.cache
def _pg_bulk_insert_statement(pinned: bool) -> Any:
    """PostgreSQL: many plain enqueues in ONE INSERT … SELECT FROM
    jsonb_array_elements(document) WITH ORDINALITY (_pg_bulk_params)."""
    rows = (
        func.jsonb_array_elements(cast(bindparam("b_rows", type_=Text()), JSONB()))
        .table_valued("value", with_ordinality="ord")
        .render_derived(name="b")
    )
    fields = {
        name: rows.c.value.op("->>", return_type=Text())(literal_column(str(i)))
        for i, name in enumerate(_PG_DOCUMENT_COLUMNS)
    }
    columns: dict[str, Any] = {
        name: cast(fields[name], Integer()) if name in _NUMBERS else fields[name]
        for name in _PG_DOCUMENT_COLUMNS
        if name != "sched"
    }
    columns["payload"] = rows.c.value.op("->", return_type=JSONB())(
        literal_column(str(len(_PG_DOCUMENT_COLUMNS)))
    )
    sched = cast(fields["sched"], DateTime(timezone=True))
    columns.update(_insert_values("postgresql", pinned, sched=sched))
    # ORDER BY the position: the sequence is then drawn in that order (what SQLAlchemy's
    # own ordered multi-row INSERT relies on), not only as a scan happens to go.
    pick = select(*(expr.label(name) for name, expr in columns.items())).order_by(rows.c.ord)
    return insert(TASKS).from_select(list(columns), pick).returning(T.id)


_NUMBERS = frozenset({"priority", "max_retries", "timeout_seconds"})


def _with_clock(rows: list[dict[str, Any]], now: datetime | None) -> list[dict[str, Any]]:
    """Rows with the host-side enqueue time (unused by PostgreSQL's ``now()``)."""
    clock = now or utcnow()
    times = dict.fromkeys(_CLOCKS, clock)
    return [{**row, **times} for row in rows]


_CLOCKS = ("enq_sched_now", "enq_created", "enq_updated")
#: The keys of a one-row enqueue's parameters (``_with_clock([spec.row()])``), which its
#: INSERT is compiled for (the generic bind and _SpecArgs share one compiled statement).
_ROW_KEYS = (*TaskSpec(kind="k").row(), *_CLOCKS)


#: Idempotency keys lock by bucket (a hash of the key): one transaction holds at most this
#: many advisory locks however many keys it enqueues. One lock per key ran PostgreSQL's
#: shared lock table out ("out of shared memory") past ~12,000 keys in a transaction, and
#: failed other sessions' enqueues meanwhile. Keys that share a bucket only wait for each
#: other.
KEY_LOCK_BUCKETS = 64
_KEY_LOCK_BASE = (
    int.from_bytes(hashlib.blake2b(b"async-processor:keys", digest_size=8).digest(), "big") >> 1
) & ~(2**16 - 1)


def _key_lock(key: str) -> int:
    """The advisory lock id of ``key``'s bucket (``_lock_keys``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return _KEY_LOCK_BASE + int.from_bytes(digest, "big") % KEY_LOCK_BUCKETS


_KEY_LOCKS = text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(:keys) AS k").bindparams(
    bindparam("keys", type_=pg_array(BigInteger()))
)


async def _lock_keys(session: AsyncSession, specs: list[TaskSpec]) -> None:
    """PostgreSQL: take the keys' buckets' advisory locks in one order (the lock ids,
    sorted; unnest reads the array in order) for the rest of the transaction. Two bulk
    enqueues that share keys in different orders took the unique index's locks row by row
    and deadlocked (the API answered 500); now the second waits for the first at their
    first common bucket, then finds its tasks. The insert itself keeps the caller's order,
    so ids (and so claim order) follow the input. Keys enqueued by separate calls in one
    transaction are ordered per call only (README: one call per transaction for keyed
    work)."""
    if len(specs) < 2:
        return  # one key cannot make a cycle within the call
    keys = sorted({_key_lock(s.idempotency_key or "") for s in specs})
    await session.execute(_KEY_LOCKS, {"keys": keys})


#: Rounds of insert-or-find for keyed rows: a round ends short only when a holder of one
#: of the keys was deleted between its two statements.
KEYED_INSERT_ROUNDS = 4


async def _insert_keyed(
    session: AsyncSession, specs: list[TaskSpec], now: datetime | None
) -> dict[str, EnqueuedTask]:
    dialect = dialect_of(session)
    if dialect == "postgresql":
        await _lock_keys(session, specs)
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(TASKS)
    stmt = (
        ins.values(**_insert_values(dialect, now is not None))
        .on_conflict_do_nothing(index_elements=[T.idempotency_key])
        .returning(T.id, T.idempotency_key)
    )
    created: dict[str, EnqueuedTask] = {}
    todo = specs
    for _ in range(KEYED_INSERT_ROUNDS):
        inserted = await session.execute(stmt, _with_clock([s.row() for s in todo], now))
        created.update({key: EnqueuedTask(task_id, True) for task_id, key in inserted.all() if key})
        missing = {s.idempotency_key for s in todo} - created.keys()
        if not missing:
            return created
        # The holders, locked against deletion until this transaction ends (KEY SHARE does
        # not hold back a daemon's updates), so the caller's read of them finds them.
        found = await session.execute(
            select(T.id, T.idempotency_key)
            .where(T.idempotency_key.in_(missing))
            .with_for_update(key_share=True, read=True)
        )
        created.update({key: EnqueuedTask(task_id, False) for task_id, key in found.all() if key})
        # PostgreSQL: a holder deleted (pruned) between the INSERT, which saw it, and the
        # SELECT, which did not: its key is free now, so the next round inserts it.
        todo = [s for s in specs if s.idempotency_key not in created]
        if not todo:
            return created
    raise OperationalError(
        "enqueue", {}, RuntimeError("idempotency keys deleted while enqueued; retry")
    )


async def notify_daemons(session: AsyncSession, *, cancel: bool = False) -> None:
    """Wake the daemons at commit: NOTIFY on PostgreSQL (inserts do it by trigger), the
    doorbells on SQLite (app.services.wakeups). With ``cancel``: a running job's cancel
    flag was set, and its daemon checks its flags at once instead of at its next
    heartbeat."""
    if dialect_of(session) == "postgresql":
        payload = CANCEL_PAYLOAD if cancel else ""
        await session.execute(select(func.pg_notify(NOTIFY_CHANNEL, payload)))
    else:
        wake_daemons_at_commit(session, cancel=cancel)


# --- claim and leases ----------------------------------------------------------------------


_CLAIM_FILTERS = {
    "queues": lambda p: T.queue.in_(p),
    "exclude_queues": lambda p: T.queue.not_in(p),
    "kinds": lambda p: T.kind.in_(p),
    "exclude_kinds": lambda p: T.kind.not_in(p),
    "only_ids": lambda p: T.id.in_(p),
}


@functools.cache
def _claim_statement(db_clock: bool, filters: frozenset[str], dialect: str = "sqlite") -> Any:
    """The claim, built once per shape: its values are bound parameters (``c_*``), so each
    call skips building the statement and its cache key (a large share of a claim's cost).
    ``db_clock``: PostgreSQL's ``now()``; otherwise the clock is bound (``c_now``).

    The payload and the schedule come back as text and a number (_claim_returning), read
    row by row in ClaimedTask.from_row: a row whose values Python cannot read (a payload
    edited into invalid JSON or nested thousands deep, a date before year 1) then fails
    alone, where decoding the whole result had failed the claim (SQLite: rolled back and
    tried again for ever, every other job held back; PostgreSQL: committed, and every job
    claimed with it run by nobody until its lease expired)."""
    if db_clock:
        current: ColumnElement[datetime] = func.now()
        until = func.now() + bindparam("c_lease", type_=Interval())
    else:
        current = bindparam("c_now", type_=UTCDateTime())
        until = bindparam("c_lease_until", type_=UTCDateTime())
    filtered = [
        _CLAIM_FILTERS[name](bindparam(f"c_{name}", expanding=True)) for name in sorted(filters)
    ]
    # In claim order through the pending index, stopping after `limit` rows, locked as
    # read; SKIP LOCKED lets daemons claim side by side without waiting on each other.
    pick = _due_in_order(
        dialect,
        (T.id,),
        current,
        filtered,
        bindparam("c_limit", type_=Integer()),
        lock=True,
        # tasks named by id (a flow-limited kind's pick, inline mode): the ids bound the
        # read, and reading them once beats once per priority
        by_priority="only_ids" not in filters,
    )
    return (
        update(TASKS)
        .where(T.id.in_(pick.scalar_subquery()))
        .values(
            status=TaskStatus.PROCESSING,
            locked_by=bindparam("c_processor", type_=String()),
            # A hand-edited MAX_INT stays (PostgreSQL's 32-bit + 1 failed every claim)
            attempts=case((T.attempts < MAX_INT, T.attempts + 1), else_=T.attempts),
            started_at=current,
            updated_at=current,
            lease_expires_at=until,
        )
        .returning(
            *REF_COLUMNS,
            T.queue,
            cast(T.payload, Text()).label("payload"),
            T.priority,
            T.retry_count,
            T.max_retries,
            T.timeout_seconds,
            _claimed_schedule(dialect).label("scheduled_at"),
            T.cancel_requested,
        )
    )


def _due_in_order(
    dialect: str,
    columns: Sequence[Any],
    current: ColumnElement[datetime],
    wheres: Sequence[ColumnElement[bool]],
    limit: Any,
    *,
    lock: bool = False,
    by_priority: bool = True,
) -> Select[Any]:
    """The first ``limit`` due pending tasks outside paused queues that match ``wheres``,
    in claim order (priority DESC, scheduled_at, id), read from the pending index in its
    order with each priority's due range (``priority = p AND scheduled_at <= now``) a
    bound of the scan: no sort, and no task scheduled for later is read, whatever its
    priority. With the schedule a filter over the whole index, a read that found fewer due
    tasks than it asked for read every later task (100,000 due tomorrow: a SQLite claim
    ~12 ms instead of ~0.6, a PostgreSQL one ~4 ms instead of ~1.3). ``lock``: FOR UPDATE
    SKIP LOCKED (the claim). Not ``by_priority`` (PostgreSQL): one ordered read, the
    schedule a filter, for a read that ``wheres`` bound otherwise (by task ids).

    SQLite: the priorities written out (_DUE_PRIORITIES), a plan fixed without statistics.
    PostgreSQL: the priorities from highest to lowest, and for each (LATERAL) its due tasks,
    until ``limit`` are found; the nested loop keeps the series' order and stops pulling
    (and locking) at the limit. There, the ``IN`` list led PostgreSQL 15, with few tasks
    pending, to read another index and sort, a plan a prepared claim could keep while a
    backlog built up; a scan per priority it reads in order."""
    base = (
        # status as a literal, so the planner can match the partial index's predicate
        # even in a generic (parameter-blind) plan
        T.status == _PENDING_LITERAL,
        T.scheduled_at <= current,
        T.queue.not_in(PAUSED_QUEUES),
        *wheres,
    )
    if dialect != "postgresql" or not by_priority:
        stmt = (
            select(*columns)
            .where(*([_DUE_PRIORITIES] if dialect != "postgresql" else []), *base)
            .order_by(T.priority.desc(), T.scheduled_at, T.id)
            .limit(limit)
        )
        return stmt.with_for_update(skip_locked=True) if lock else stmt
    priorities = (
        func.generate_series(
            literal_column(str(MAX_PRIORITY), Integer()),
            literal_column(str(MIN_PRIORITY), Integer()),
            literal_column("-1", Integer()),
        )
        .table_valued("priority")
        .render_derived(name="p")
    )
    per_priority = (
        select(*columns)
        .where(T.priority == priorities.c.priority, *base)
        .order_by(T.scheduled_at, T.id)
        .limit(limit)
    )
    if lock:
        per_priority = per_priority.with_for_update(skip_locked=True)
    due = per_priority.lateral("due")
    return select(*due.c).select_from(priorities).join(due, true()).limit(limit)


def _claimed_schedule(dialect: str) -> ColumnElement[Any]:
    """scheduled_at as the claim returns it: PostgreSQL's seconds since the epoch (any
    timestamptz has one, BC and infinity included; as a timestamp, asyncpg fails the whole
    result on one it cannot make a datetime of); SQLite's stored text."""
    if dialect == "postgresql":
        return cast(extract("epoch", T.scheduled_at), Float())
    return type_coerce(T.scheduled_at, Text())


async def claim_tasks(
    session: AsyncSession,
    *,
    processor_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    exclude_queues: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] | None = None,
    only_ids: Sequence[int] | None = None,
    now: datetime | None = None,
) -> list[ClaimedTask]:
    """pending → processing for up to ``limit`` due tasks, in one statement; writes their
    ``started`` notifications. Highest priority first, then oldest schedule, then id.
    Only ``queues`` (default every queue), never ``exclude_queues`` nor a paused queue;
    likewise ``kinds`` / ``exclude_kinds``; ``only_ids`` restricts the claim to those tasks
    (inline mode, per-key limits)."""
    if limit <= 0:
        return []
    filters = {
        "queues": queues,
        "exclude_queues": exclude_queues,
        "kinds": kinds,
        "exclude_kinds": exclude_kinds,
        "only_ids": only_ids,
    }
    dialect = dialect_of(session)
    db_clock = now is None and dialect == "postgresql"
    stmt, params = _claim_call(filters, processor_id, limit, lease_seconds, db_clock, now, dialect)
    claimed = _in_claim_order(await hotpath.fetch(session, stmt, params))
    await notifications.add(session, _started_notes(claimed))
    return claimed


def claim_tasks_sqlite3(
    conn: sqlite3.Connection,
    dialect: Dialect,
    *,
    processor_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    exclude_queues: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] | None = None,
) -> list[ClaimedTask]:
    """``claim_tasks`` on a bare ``sqlite3`` connection, in the caller's write transaction
    (the claim loop's pick-up, Database.run_write's ``here``): the same two statements,
    without a session around them (~0.6 ms of a ~0.8 ms claim on this machine)."""
    if limit <= 0:
        return []
    filters = {"queues": queues, "exclude_queues": exclude_queues, "exclude_kinds": exclude_kinds}
    stmt, params = _claim_call(filters, processor_id, limit, lease_seconds, False, None, "sqlite")
    claimed = _in_claim_order(hotpath.sqlite3_fetch(conn, dialect, stmt, params))
    notifications.add_sqlite3(conn, dialect, _started_notes(claimed))
    return claimed


def _claim_call(
    filters: Mapping[str, Sequence[Any] | None],
    processor_id: str,
    limit: int,
    lease_seconds: float,
    db_clock: bool,
    now: datetime | None,
    dialect: str,
) -> tuple[Any, dict[str, Any]]:
    """The claim statement of this shape and its parameters, the clock's included."""
    used, params = _claim_params(filters, processor_id, limit)
    if db_clock:
        params["c_lease"] = timedelta(seconds=lease_seconds)
    else:
        clock = now or utcnow()
        params.update(c_now=clock, c_lease_until=clock + timedelta(seconds=lease_seconds))
    return _claim_statement(db_clock, used, dialect), params


def _started_notes(claimed: Sequence[ClaimedTask]) -> list[dict[str, Any]]:
    return [
        notifications.build(
            NotificationType.STARTED, t.ref, notifications.started_message(t.attempt, t.kind)
        )
        for t in claimed
    ]


@functools.cache
def _claim_alone_statement(filters: frozenset[str]) -> Any:
    """PostgreSQL: the claim and its ``started`` notifications in ONE statement (the claim's
    UPDATE … RETURNING as a CTE, the notifications INSERT as another), for a claim that is
    its own transaction: sent outside BEGIN … COMMIT it is one round trip, not four."""
    claimed = _claim_statement(True, filters, "postgresql").cte("claimed")
    notes = notifications.started_insert(
        claimed, (claimed.c.priority.desc(), claimed.c.scheduled_at, claimed.c.id)
    ).cte("started_notes")
    return select(claimed).add_cte(notes)


async def claim_tasks_alone(
    conn: AsyncConnection,
    *,
    processor_id: str,
    limit: int,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
    exclude_queues: Sequence[str] | None = None,
    exclude_kinds: Sequence[str] | None = None,
) -> list[ClaimedTask] | None:
    """``claim_tasks`` as its own transaction on a connection that has none open: on
    PostgreSQL one autocommitted statement. None when that is not possible here (another
    engine or driver): the caller claims in a transaction instead."""
    if limit <= 0:
        return []
    if conn.dialect.name != "postgresql":
        return None
    filters = {"queues": queues, "exclude_queues": exclude_queues, "exclude_kinds": exclude_kinds}
    used, params = _claim_params(filters, processor_id, limit)
    params["c_lease"] = timedelta(seconds=lease_seconds)
    rows = await hotpath.fetch_autocommit(conn, _claim_alone_statement(used), params)
    return None if rows is None else _in_claim_order(rows)


def _claim_params(
    filters: Mapping[str, Sequence[Any] | None], processor_id: str, limit: int
) -> tuple[frozenset[str], dict[str, Any]]:
    """The claim's shape (the filters in use; ``only_ids`` even when empty) and its
    parameters, but the clock's."""
    used = {
        name: list(values)
        for name, values in filters.items()
        if values or (name == "only_ids" and values is not None)
    }
    params: dict[str, Any] = {f"c_{name}": value for name, value in used.items()}
    params.update(c_limit=limit, c_processor=processor_id)
    return frozenset(used), params


def _in_claim_order(rows: Sequence[Any]) -> list[ClaimedTask]:
    claimed = [ClaimedTask.from_row(r) for r in rows]
    claimed.sort(key=lambda t: (-t.priority, t.scheduled_at, t.id))
    return claimed


KEY_SCAN_PER_SLOT = 20


def _flow_lock_key(kind: str) -> int:
    """A stable 63-bit advisory lock key per kind (claims of one limited kind take turns)."""
    digest = hashlib.blake2b(f"async-processor:flow:{kind}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


#: A due task's place in the claim order: (priority, scheduled_at, id), claimed highest
#: priority first, then oldest schedule, then lowest id (``claim_order``).
Due = tuple[int, datetime, int]


def claim_order(due: Due) -> tuple[int, datetime, int]:
    """The sort key that puts due tasks in the order a claim takes them."""
    priority, scheduled_at, task_id = due
    return (-priority, scheduled_at, task_id)


@dataclass(frozen=True, slots=True)
class LimitedPick:
    """What ``pick_limited`` found for one flow-controlled kind: the due tasks it may start
    now, in claim order; when its rate limit is spent, the seconds until its window frees a
    start (``wait``); and the clock the claim must use."""

    kind: str
    rate: RateLimit | None
    due: list[Due]
    wait: float | None
    now: datetime


def _due_select(
    dialect: str,
    columns: Sequence[Any],
    current: ColumnElement[datetime],
    queues: Sequence[str] | None,
    exclude_queues: Sequence[str] | None,
    wheres: Sequence[ColumnElement[bool]],
    limit: int,
) -> Select[Any]:
    """The first ``limit`` due tasks matching ``wheres`` outside paused queues, in claim
    order (no lock): what a claim would take."""
    scope = list(wheres)
    if queues:
        scope.append(T.queue.in_(list(queues)))
    if exclude_queues:
        scope.append(T.queue.not_in(list(exclude_queues)))
    return _due_in_order(dialect, columns, current, scope, limit)


@functools.cache
def _next_due_statement(dialect: str, filtered: bool) -> Any:
    """The earliest schedule of a pending task not yet due: one ``min`` per priority (each
    the first entry of that priority's range after now in the pending index, an index
    seek), the least of them. PostgreSQL answers in seconds from its own clock."""
    current = func.now() if dialect == "postgresql" else bindparam("n_now", type_=UTCDateTime())
    arms = []
    for priority in range(MAX_PRIORITY, MIN_PRIORITY - 1, -1):
        arm = select(func.min(T.scheduled_at).label("at")).where(
            T.status == _PENDING_LITERAL,
            T.priority == literal_column(str(priority), Integer()),
            T.scheduled_at > current,
        )
        if filtered:
            arm = arm.where(T.queue.in_(bindparam("n_queues", expanding=True)))
        arms.append(arm)
    earliest = union_all(*arms).subquery()
    if dialect == "postgresql":
        # epochs, not a difference of timestamps: 'infinity' (by hand) has an epoch
        return select(extract("epoch", func.min(earliest.c.at)) - extract("epoch", current))
    return select(type_coerce(func.min(earliest.c.at), Text()))


async def next_due_in(
    session: AsyncSession, *, queues: Sequence[str] | None = None, now: datetime | None = None
) -> float | None:
    """Seconds until the next pending task (of ``queues``, default any) scheduled for later
    becomes due; None when there is none, or when its time cannot be told (a hand-edited
    'infinity', or text Python cannot read). By the database's clock on PostgreSQL."""
    dialect = dialect_of(session)
    params: dict[str, Any] = {}
    if queues is not None:
        if not queues:
            return None
        params["n_queues"] = list(queues)
    if dialect == "postgresql":
        value = (
            await session.execute(_next_due_statement(dialect, queues is not None), params)
        ).scalar_one()
        if value is None or not math.isfinite(float(value)):
            return None
        return max(float(value), 0.0)
    current = now or utcnow()
    params["n_now"] = current
    text_value = (
        await session.execute(_next_due_statement(dialect, queues is not None), params)
    ).scalar_one()
    if text_value is None:
        return None
    at = _read_schedule(text_value)
    if at in (_EARLIEST, _LATEST):  # not a time Python can read: the poll finds it
        return None
    return max((at - current).total_seconds(), 0.0)


async def peek_due(
    session: AsyncSession,
    *,
    limit: int,
    exclude_kinds: Sequence[str] = (),
    queues: Sequence[str] | None = None,
    exclude_queues: Sequence[str] | None = None,
) -> list[Due]:
    """The first ``limit`` due tasks a claim would take (no lock, nothing changed): where
    the kinds without flow limits stand against the limited kinds' picks."""
    if limit <= 0:
        return []
    dialect = dialect_of(session)
    stmt = _due_select(
        dialect,
        (T.priority, T.scheduled_at, T.id),
        now_sql(dialect),
        queues,
        exclude_queues,
        [T.kind.not_in(list(exclude_kinds))] if exclude_kinds else [],
        limit,
    )
    return sorted(((p, at, i) for p, at, i in (await session.execute(stmt)).all()), key=claim_order)


def _of_kind(kind: str) -> ColumnElement[bool]:
    """``kind = :kind`` for a read of pending or running rows, kept off the ``(kind, id)``
    index, which holds the kind's whole history, on both engines (SQLite, planning without
    statistics, read all of it: ~47 ms a pick with 300,000 finished rows of the kind,
    against 0.03 ms through the pending index; PostgreSQL, db.UnindexedText)."""
    return UnindexedText(T.kind) == kind


async def pick_limited(
    session: AsyncSession,
    *,
    kind: str,
    limit: int,
    rate: RateLimit | None = None,
    key: KeyLimit | None = None,
    queues: Sequence[str] | None = None,
    exclude_queues: Sequence[str] | None = None,
    now: datetime | None = None,
) -> LimitedPick:
    """Up to ``limit`` due tasks of one flow-controlled ``kind`` that may start now: at most
    ``rate.count`` starts per ``rate.seconds`` and at most ``key.limit`` running tasks per
    value of ``key.column`` (NULL keys are not limited), counted over every daemon. Claims
    of one limited kind take turns from here to the transaction's end (a transaction-level
    advisory lock on PostgreSQL; SQLite has one writer anyway), so what is picked is still
    within the limits when ``claim_picked`` claims it in the same transaction."""
    dialect = dialect_of(session)
    if dialect == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(_flow_lock_key(kind))))
        # The time after the lock, not the transaction's start: claims of this kind are
        # then stamped in the order they happen, across daemons.
        if now is None:
            now = (await session.execute(select(func.clock_timestamp()))).scalar_one()
    now = now or utcnow()
    if limit <= 0:
        return LimitedPick(kind, rate, [], None, now)
    current = now_sql(dialect, now)
    allowed = limit
    if rate is not None:
        await session.execute(
            delete(STARTS).where(
                STARTS.c.kind == kind,
                STARTS.c.started_at <= now - timedelta(seconds=rate.seconds),
            )
        )
        used, oldest = (
            await session.execute(
                select(func.count(), func.min(STARTS.c.started_at)).where(STARTS.c.kind == kind)
            )
        ).one()
        allowed = min(limit, rate.count - used)
        if allowed <= 0:
            wait = (oldest + timedelta(seconds=rate.seconds) - now).total_seconds()
            return LimitedPick(kind, rate, [], max(wait, 0.001), now)
    if key is not None:
        due = await _pick_within_key_limit(
            session, kind, key, allowed, current, queues, exclude_queues
        )
    else:
        stmt = _due_select(
            dialect,
            (T.priority, T.scheduled_at, T.id),
            current,
            queues,
            exclude_queues,
            [_of_kind(kind)],
            allowed,
        )
        rows = await session.execute(stmt)
        due = sorted(((p, at, i) for p, at, i in rows.all()), key=claim_order)
    return LimitedPick(kind, rate, due, None, now)


async def claim_picked(
    session: AsyncSession,
    pick: LimitedPick,
    *,
    processor_id: str,
    lease_seconds: float,
    take: int | None = None,
    queues: Sequence[str] | None = None,
    exclude_queues: Sequence[str] | None = None,
) -> list[ClaimedTask]:
    """Claim the first ``take`` (default all) of ``pick``'s tasks, in the transaction that
    picked them, and count their starts against the kind's rate limit."""
    ids = [task_id for _, _, task_id in pick.due[: len(pick.due) if take is None else take]]
    if not ids:
        return []
    claimed = await claim_tasks(
        session,
        processor_id=processor_id,
        limit=len(ids),
        lease_seconds=lease_seconds,
        queues=queues,
        exclude_queues=exclude_queues,
        kinds=[pick.kind],
        only_ids=ids,
        now=pick.now,
    )
    if pick.rate is not None and claimed:
        current = now_sql(dialect_of(session), pick.now)
        starts = [{"kind": pick.kind, "started_at": current} for _ in claimed]
        await session.execute(insert(STARTS).values(starts))
    return claimed


#: Rounds of ``_pick_within_key_limit``'s scan, each past the keys the rounds before filled.
KEY_SCAN_ROUNDS = 4


async def _pick_within_key_limit(
    session: AsyncSession,
    kind: str,
    key: KeyLimit,
    allowed: int,
    current: ColumnElement[datetime],
    queues: Sequence[str] | None,
    exclude_queues: Sequence[str] | None,
) -> list[Due]:
    """The first due tasks of ``kind``, in claim order, that keep every key under its limit.

    Keys already at their limit (counted over every daemon) are left out by the statement
    itself, so a backlog of one busy key does not hide the other keys' tasks behind it
    (the scan read the first 20 per slot in claim order, and 1,000 tasks of one chapter
    held every other chapter back for hours while slots stood idle). A page can still fill
    with a key that reaches its limit within the page; the next round leaves it out too."""
    column = T[key.column]
    # The running rows of the kind, through the partial index over running rows: neither
    # the kind's nor the key column's index, which hold every finished row too.
    running_of_kind = (T.status == _PROCESSING_LITERAL, _of_kind(kind))
    at_limit = (
        select(column)
        .where(*running_of_kind, Unindexed(column).is_not(None))
        .group_by(Unindexed(column))
        .having(func.count() >= key.limit)
    )
    page = allowed * KEY_SCAN_PER_SLOT
    running: dict[str, int] = {}
    filled: set[str] = set()  # keys that reached their limit with this pick's tasks
    chosen: list[Due] = []
    taken: set[int] = set()
    for _ in range(KEY_SCAN_ROUNDS):
        wheres = [_of_kind(kind), or_(column.is_(None), column.not_in(at_limit))]
        if filled:
            wheres.append(or_(column.is_(None), column.not_in(list(filled))))
        if taken:
            wheres.append(T.id.not_in(list(taken)))
        stmt = _due_select(
            dialect_of(session),
            (T.priority, T.scheduled_at, T.id, column),
            current,
            queues,
            exclude_queues,
            wheres,
            page,
        )
        # in claim order (PostgreSQL's per-priority read gives it, but says no ORDER BY)
        candidates = sorted((await session.execute(stmt)).all(), key=lambda r: claim_order(r[:3]))
        new_keys = {v for *_, v in candidates if v is not None and v not in running}
        if new_keys:
            busy = (
                select(column, func.count())
                .where(*running_of_kind, Unindexed(column).in_(new_keys))
                .group_by(Unindexed(column))
            )
            running.update(dict.fromkeys(new_keys, 0))
            for value, n in (await session.execute(busy)).all():
                running[value] = n
        for priority, scheduled_at, task_id, value in candidates:
            if value is not None:
                if running[value] >= key.limit:
                    filled.add(value)
                    continue
                running[value] += 1
                if running[value] >= key.limit:
                    filled.add(value)
            chosen.append((priority, scheduled_at, task_id))
            taken.add(task_id)
            if len(chosen) == allowed:
                return chosen
        if len(candidates) < page:
            break  # every due task of the kind was seen
    return chosen


def _held(processor_id: str, tasks: Iterable[tuple[int, int]]) -> ColumnElement[bool]:
    pairs = list(tasks)
    if faults.seeded("fence"):  # test-only seeded bug (app.services.faults)
        return T.id.in_([task_id for task_id, _ in pairs])
    return and_(
        T.status == TaskStatus.PROCESSING,
        T.locked_by == processor_id,
        tuple_(T.id, T.attempts).in_(pairs),
    )


def _unlocked(current: ColumnElement[datetime]) -> dict[str, Any]:
    """The columns every transition out of processing clears."""
    return {"locked_by": None, "lease_expires_at": None, "updated_at": current}


def _fenced(task_id: int, processor_id: str, attempt: int) -> ColumnElement[bool]:
    if faults.seeded("fence"):  # test-only seeded bug (app.services.faults)
        return T.id == task_id
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
    # Rows locked in id order, as finish_tasks locks them: the heartbeat and the completer
    # of one daemon touch the same rows at once, and two transactions taking the same row
    # locks in different orders deadlock (PostgreSQL; SQLite has one writer).
    held = select(T.id).where(_held(processor_id, tasks)).order_by(T.id).with_for_update()
    stmt = (
        update(TASKS)
        .where(T.id.in_(held.scalar_subquery()))
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
        update(TASKS)
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


class Finish(StrEnum):
    """How an attempt ended, as its daemon reports it."""

    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"  # stopped on a user's request
    SNOOZE = "snooze"  # run again later, without charging the attempt or a retry


@dataclass(frozen=True, slots=True)
class Finished:
    """One attempt's end, written fenced on (task_id, processor, attempt)."""

    task_id: int
    attempt: int
    how: Finish
    result: Any = None
    error: str | None = None
    permanent: bool = False  # FAIL: no retry whatever the budget
    retry_delay: float = 0.0  # FAIL: seconds before the retry
    snooze_seconds: float = 0.0  # SNOOZE: seconds before the next run
    duration_seconds: float | None = None
    token_usage: int = 0
    ref: TaskRef | None = None  # the task as claimed (complete_tasks_alone's notification)


_LOCKED_COLUMNS = (
    *REF_COLUMNS,
    T.retry_count,
    T.max_retries,
    T.cancel_requested,
    T.error,
    T.duration_seconds,
)
_FENCE = and_(
    T.id == bindparam("b_id"),
    T.status == TaskStatus.PROCESSING,
    T.locked_by == bindparam("b_locked_by"),
    T.attempts == bindparam("b_attempt"),
)
if faults.seeded("fence"):  # test-only seeded bug: by id alone (the parameters stay bound)
    _FENCE = and_(
        T.id == bindparam("b_id"),
        bindparam("b_locked_by", type_=String()).is_not(None),
        bindparam("b_attempt", type_=Integer()).is_not(None),
    )


def _token_count(tokens: int) -> int:
    """One attempt's token usage as the column can add it (0..MAX_INT)."""
    return tokens if 0 <= tokens <= MAX_INT else min(max(int(tokens), 0), MAX_INT)


def _tokens_added(tokens: Any) -> ColumnElement[int]:
    """The row's token usage plus ``tokens`` (0..MAX_INT), saturating at MAX_INT, computed
    without overflowing the 32-bit column (PostgreSQL would refuse the whole write)."""
    ceiling = literal_column(str(MAX_INT), Integer())
    return case((T.token_usage > ceiling - tokens, ceiling), else_=T.token_usage + tokens)


_UNLOCKED_VALUES: dict[str, Any] = {
    "locked_by": None,
    "lease_expires_at": None,
    "updated_at": bindparam("b_now", type_=UTCDateTime()),
    "completed_at": bindparam("b_completed_at", type_=UTCDateTime()),
    "duration_seconds": bindparam("b_duration", type_=Float()),
    "token_usage": _tokens_added(bindparam("b_tokens", type_=Integer())),
}
# The hot path: one executemany for every completion of a batch.
_COMPLETE = (
    update(TASKS)
    .where(_FENCE)
    .values(
        status=TaskStatus.COMPLETED,
        result=bindparam("b_result", type_=JSONType),
        error=None,
        **_UNLOCKED_VALUES,
    )
)
# Every other end: the new state is computed from the locked row, then written.
_END = (
    update(TASKS)
    .where(_FENCE)
    .values(
        status=bindparam("b_status", type_=String()),
        error=bindparam("b_error", type_=Text()),
        retry_count=bindparam("b_retry_count", type_=Integer()),
        attempts=bindparam("b_attempts", type_=Integer()),
        # None keeps the row's own: never read back into Python, where a hand-edited value
        # no datetime holds (a BC date) had failed the write, and the completer retried it
        # for ever
        scheduled_at=func.coalesce(
            bindparam("b_scheduled_at", type_=UTCDateTime()), T.scheduled_at
        ),
        **_UNLOCKED_VALUES,
    )
)


def _unnested_ends(name: str) -> Any:
    """PostgreSQL: a batch's completions as arrays unnested (``u_id``, ``u_attempt``,
    ``u_result``, ``u_duration``, ``u_tokens``), a table named ``name``."""
    arrays = (
        ("id", T.id.type),
        ("attempt", T.attempts.type),
        ("result", JSONB()),
        ("duration", T.duration_seconds.type),
        ("tokens", T.token_usage.type),
    )
    return (
        func.unnest(*(bindparam(f"u_{name}", type_=pg_array(kind)) for name, kind in arrays))
        .table_valued(*(name for name, _ in arrays))
        .render_derived(name=name)
    )


def _completed_values(v: Any, now: ColumnElement[datetime]) -> dict[str, Any]:
    """The columns a completion writes, from a row of ``_unnested_ends``."""
    return {
        "status": TaskStatus.COMPLETED,
        "result": v.c.result,
        "error": None,
        "locked_by": None,
        "lease_expires_at": None,
        "updated_at": now,
        "completed_at": now,
        "duration_seconds": v.c.duration,
        "token_usage": _tokens_added(v.c.tokens),
    }


def _fenced_ends(owner: Any) -> tuple[Any, ColumnElement[bool]]:
    """PostgreSQL: the batch's ends as a MATERIALIZED CTE carrying the fence's constants
    (status ``processing``, this daemon), and the fence as a join of ``pending_analysis``
    to it. As columns of a materialized CTE the constants cannot be matched to the partial
    indexes over running rows. When they could, the planner (their statistics often say one
    running row) scanned this daemon's running rows once per end: quadratic in what a
    daemon holds, ~8 ms for 140 ends beside 1,000,000 finished rows, instead of one
    primary-key lookup per end."""
    v = (
        select(
            _unnested_ends("u"),
            literal(TaskStatus.PROCESSING.value, String()).label("expected"),
            owner.label("owner"),
        )
        .cte("ends")
        .prefix_with("MATERIALIZED")
    )
    fence = and_(T.id == v.c.id, T.status == v.c.expected, T.locked_by == v.c.owner)
    return v, fence


def _fence_on(ends: Any) -> ColumnElement[bool]:
    """The fence against a row set carrying each end's id and attempt and the fence's
    constants as columns (``expected``, ``owner``: see ``_fenced_ends``)."""
    return and_(
        T.id == ends.c.id,
        T.status == ends.c.expected,
        T.locked_by == ends.c.owner,
        T.attempts == ends.c.attempt,
    )


def _complete_unnested() -> Any:
    """PostgreSQL: every completion of a batch in ONE fenced statement over unnested arrays
    (one execution instead of one per row); the same values as ``_COMPLETE``."""
    v, fence = _fenced_ends(bindparam("b_locked_by", type_=String()))
    return (
        update(TASKS)
        .where(fence, T.attempts == v.c.attempt)
        .values(**_completed_values(v, bindparam("b_now", type_=UTCDateTime())))
    )


_COMPLETE_UNNESTED = _complete_unnested()


@functools.cache
def _complete_alone_statement() -> Any:
    """PostgreSQL: a batch of completions and their ``completed`` notifications in ONE
    statement, for a batch that is its own transaction (``complete_tasks_alone``): sent
    outside BEGIN … COMMIT it is one round trip instead of five, and the feed's lock is held
    only while it runs. The rows are locked in id order first, as ``finish_tasks`` and the
    heartbeat lock them; the fence is in the UPDATE's WHERE, as in ``_COMPLETE_UNNESTED``;
    a notification is inserted only for a row the UPDATE wrote (``_fenced_ends``: why the
    fence joins the batch's rows).

    The locked rows carry their end's values (``locked``), so the UPDATE joins one row set
    by primary key. Locking in a subquery and joining the ends again let the planner scan
    the ends once per locked row when its statistics said few of either (beside 1,000,000
    finished rows it did: quadratic in the batch, ~6 ms of a 100-row batch's 25 ms)."""
    v, held = _fenced_ends(bindparam("b_locked_by", type_=String()))
    locked = (
        select(*v.c)
        .select_from(v)
        .join(TASKS, held)
        .order_by(T.id)
        .with_for_update(of=TASKS)
        .cte("locked")
    )
    fence = _fence_on(locked)
    done = (
        update(TASKS)
        .where(fence)
        .values(**_completed_values(locked, func.now()))
        .returning(T.id)
        .cte("done")
    )
    notes = notifications.insert_for_tasks(select(done.c.id)).cte("completed_notes")
    return select(done.c.id).add_cte(notes)


async def complete_tasks_alone(
    conn: AsyncConnection, *, processor_id: str, items: Sequence[Finished]
) -> list[TaskStatus | None] | None:
    """``finish_tasks`` for a batch of completions as its own transaction, on a connection
    with none open: on PostgreSQL one autocommitted statement. Each item must carry its
    ``ref`` (the task as claimed) and its duration. Returns each item's new status (None
    where the fence rejected it), or None when this path does not apply (another engine or
    driver, another kind of end, a task twice in the batch, the seeded fence bug): the
    caller uses ``finish_tasks`` in a transaction instead."""
    if (
        not items
        or conn.dialect.name != "postgresql"
        or faults.seeded("fence")
        or len({i.task_id for i in items}) != len(items)
        or any(
            i.how is not Finish.COMPLETE or i.ref is None or i.duration_seconds is None
            for i in items
        )
    ):
        return None
    notes = [_completed_note(i.ref, i.duration_seconds) for i in items if i.ref is not None]
    params: dict[str, Any] = {
        "b_locked_by": processor_id,
        "u_id": [i.task_id for i in items],
        "u_attempt": [i.attempt for i in items],
        "u_result": [i.result for i in items],
        "u_duration": [i.duration_seconds for i in items],
        "u_tokens": [_token_count(i.token_usage) for i in items],
        **notifications.array_params(notes),
    }
    rows = await hotpath.fetch_autocommit(conn, _complete_alone_statement(), params)
    if rows is None:
        return None
    written = {r.id for r in rows}
    return [TaskStatus.COMPLETED if i.task_id in written else None for i in items]


def _completed_note(task: TaskRef, duration: float | None) -> dict[str, Any]:
    message = "Finished." if duration is None else f"Finished in {duration:.2f} s."
    return notifications.build(NotificationType.COMPLETED, task, message, duration_seconds=duration)


async def _write_completions(
    session: AsyncSession, completes: list[dict[str, Any]], db_clock: bool
) -> None:
    """A batch's completions (``_decide``'s parameters): one statement for the batch on
    either engine, the executemany of ``_COMPLETE`` for one, for the seeded fence bug, and
    where the one statement's form does not apply."""
    if len(completes) < 2 or faults.seeded("fence"):
        await hotpath.execute_many(session, _COMPLETE, completes)
        return
    if not db_clock:
        document = _sqlite_completions(session, completes)
        if document is None:
            await hotpath.execute_many(session, _COMPLETE, completes)
        else:
            await hotpath.fetch(session, _sqlite_complete_document(), document)
        return
    params = {
        "b_now": completes[0]["b_now"],  # the database's clock, one per transaction
        "b_locked_by": completes[0]["b_locked_by"],
        "u_id": [c["b_id"] for c in completes],
        "u_attempt": [c["b_attempt"] for c in completes],
        "u_result": [c["b_result"] for c in completes],
        "u_duration": [c["b_duration"] for c in completes],
        "u_tokens": [c["b_tokens"] for c in completes],
    }
    await hotpath.fetch(session, _COMPLETE_UNNESTED, params)


def _sqlite_completions(
    session: AsyncSession, completes: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """SQLite: the parameters of ``_sqlite_complete_document`` for ``completes``, or None
    when the executemany writes them instead: not SQLite 3.38 or later (PostgreSQL with a
    caller's clock goes that way too), an engine with its own JSON serializer (the
    document holds ``json.dumps``'s text of each result), a result JSON has no strict
    text for (NaN), which the executemany's own encoding then stores or refuses as ever,
    or results too large together for one value (over ``SQLITE_DOCUMENT_BYTES``)."""
    dialect = session.get_bind().dialect
    if (
        dialect.name != "sqlite"
        or not SQLITE_JSON_ARROWS
        or _PAYLOAD_C_ENCODER is None
        or getattr(dialect, "_json_serializer", None) is not None
    ):
        return None
    encode = _PAYLOAD_C_ENCODER
    try:
        rows = [
            [
                c["b_id"],
                c["b_attempt"],
                c["b_duration"],
                c["b_tokens"],
                "".join(encode(c["b_result"], 0)),
            ]
            for c in completes
        ]
        document = "".join(encode(rows, 0))
    except (TypeError, ValueError, RecursionError):
        return None
    if len(document) > SQLITE_DOCUMENT_BYTES:  # huge results: one bound value stays small
        return None
    first = completes[0]
    return {"b_now": first["b_now"], "b_locked_by": first["b_locked_by"], "d_rows": document}


@functools.cache
def _sqlite_complete_document(returning: bool = False) -> Any:
    """SQLite: every completion of a batch in ONE fenced statement, ``_COMPLETE``'s values
    for each row of a JSON document (arrays of id, attempt, duration, tokens and the
    result's JSON text), instead of an executemany that binds each row in Python and steps
    the UPDATE once per row (~50 → ~22 µs a completion on this VM). The rows come from a
    MATERIALIZED CTE whose columns carry the fence's constants, as on PostgreSQL
    (``_fenced_ends``): written as constants, ``locked_by = ?`` matched the index over
    running rows and SQLite scanned the document once per running row of this daemon
    (quadratic, ~4 ms a completion in a batch of 124); as columns, each row is one
    primary-key lookup."""
    doc = func.json_each(bindparam("d_rows", type_=Text())).table_valued("key", "value")
    doc = doc.alias("d")

    def field(i: int) -> Any:
        return doc.c.value.op("->>")(literal_column(str(i)))

    ends = (
        select(
            field(0).label("id"),
            field(1).label("attempt"),
            field(2).label("duration"),
            field(3).label("tokens"),
            field(4).label("result"),
            literal(TaskStatus.PROCESSING.value, String()).label("expected"),
            bindparam("b_locked_by", type_=String()).label("owner"),
        )
        .select_from(doc)
        .cte("ends")
        .prefix_with("MATERIALIZED")
    )
    fence = _fence_on(ends)
    now = bindparam("b_now", type_=UTCDateTime())
    values = _completed_values(ends, now)
    # a completion without a duration keeps the row's (the general path passes it resolved)
    values["duration_seconds"] = func.coalesce(ends.c.duration, T.duration_seconds)
    statement = update(TASKS).where(fence).values(**values)
    return statement.returning(T.id, T.attempts) if returning else statement


@functools.cache
def _lock_statement(db_clock: bool, by_id_only: bool) -> Any:
    """finish_tasks' first statement, built once: lock the rows this daemon still holds
    (``f_pairs``: (id, attempt)) and read the database's clock."""
    clock = (func.now() if db_clock else bindparam("c_now", type_=UTCDateTime())).label("clock")
    held: ColumnElement[bool] = and_(
        T.status == TaskStatus.PROCESSING,
        T.locked_by == bindparam("f_processor", type_=String()),
        tuple_(T.id, T.attempts).in_(bindparam("f_pairs", expanding=True)),
    )
    if by_id_only:  # the seeded fence bug (app.services.faults)
        held = T.id.in_(bindparam("f_ids", expanding=True))
    return select(*_LOCKED_COLUMNS, clock).where(held).order_by(T.id).with_for_update()


async def finish_tasks(
    session: AsyncSession,
    *,
    processor_id: str,
    items: Sequence[Finished],
    now: datetime | None = None,
) -> list[TaskStatus | None]:
    """Write the ends of many attempts in a few statements: lock the rows this daemon still
    holds (and read the database's clock), decide each new state from the locked row, write
    them with one executemany per statement shape, and add their notifications. Returns
    each item's new status, or None where the fence rejected it (the job was rescued, or
    finished by someone else, since this daemon claimed it).

    A failure with retries left goes back to pending after ``retry_delay`` seconds, unless
    the error is permanent or a cancel was requested (then failed / cancelled). A snooze
    goes back to pending uncharged, or to cancelled when a cancel was requested.
    """
    if not items:
        return []
    if len({(i.task_id, i.attempt) for i in items}) != len(items):
        raise ValueError("finish_tasks: one end per attempt")
    done = await _complete_sqlite_batch(session, processor_id, items, now)
    if done is not None:
        return done
    db_clock = now is None and dialect_of(session) == "postgresql"
    params: dict[str, Any] = {"f_processor": processor_id}
    if faults.seeded("fence"):  # test-only seeded bug: by id alone
        params["f_ids"] = [i.task_id for i in items]
    else:
        params["f_pairs"] = [(i.task_id, i.attempt) for i in items]
    if not db_clock:
        params["c_now"] = now or utcnow()
    lock = _lock_statement(db_clock, faults.seeded("fence"))
    held = {(r.id, r.attempts): r for r in await hotpath.fetch(session, lock, params)}
    if faults.seeded("fence"):  # test-only seeded bug: whatever attempt holds the row now
        held = {
            (i.task_id, i.attempt): r for r in held.values() for i in items if i.task_id == r.id
        }
    statuses: list[TaskStatus | None] = []
    completes: list[dict[str, Any]] = []
    ends: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    for item in items:
        row = held.get((item.task_id, item.attempt))
        if row is None:
            statuses.append(None)
            continue
        status, params, note = _decide(item, row, processor_id)
        statuses.append(status)
        (completes if item.how is Finish.COMPLETE else ends).append(params)
        if note is not None:
            notes.append(note)
    await _write_completions(session, completes, db_clock)
    await hotpath.execute_many(session, _END, ends)
    await notifications.add(session, notes)
    return statuses


async def _complete_sqlite_batch(
    session: AsyncSession, processor_id: str, items: Sequence[Finished], now: datetime | None
) -> list[TaskStatus | None] | None:
    """SQLite, a batch of completions only, each with its task as claimed (``ref``): the
    fenced UPDATE of ``_sqlite_complete_document`` returns the (id, attempt) pairs it wrote,
    and their notifications follow: two statements, without first reading the rows back
    (nothing a completion writes depends on them, and the transaction already holds the
    database's only write lock). None when the batch takes the general path (another kind
    of end, a missing ``ref``, the seeded fence bug, or ``_sqlite_completions`` says no)."""
    if len(items) < 2 or faults.seeded("fence") or dialect_of(session) != "sqlite":
        return None
    if not all(i.how is Finish.COMPLETE and i.ref is not None for i in items):
        return None
    clock = now or utcnow()
    completes = [
        {
            "b_id": i.task_id,
            "b_attempt": i.attempt,
            "b_duration": i.duration_seconds,  # None: the row keeps its own (COALESCE)
            "b_tokens": _token_count(i.token_usage),
            "b_result": i.result,
            "b_now": clock,
            "b_locked_by": processor_id,
        }
        for i in items
    ]
    document = _sqlite_completions(session, completes)
    if document is None:
        return None
    rows = await hotpath.fetch(session, _sqlite_complete_document(returning=True), document)
    written = {(r.id, r.attempts) for r in rows}
    notes = [
        _completed_note(i.ref, i.duration_seconds)
        for i in items
        if i.ref is not None and (i.task_id, i.attempt) in written
    ]
    await notifications.add(session, notes)
    return [TaskStatus.COMPLETED if (i.task_id, i.attempt) in written else None for i in items]


def _decide(
    item: Finished, row: Any, processor_id: str
) -> tuple[TaskStatus, dict[str, Any], dict[str, Any] | None]:
    """The new state of one held row, as statement parameters, and its notification."""
    now: datetime = row.clock
    task = TaskRef.from_row(row)
    params: dict[str, Any] = {
        "b_id": item.task_id,
        "b_locked_by": processor_id,
        "b_attempt": item.attempt,
        "b_now": now,
        "b_completed_at": now,
        "b_duration": row.duration_seconds
        if item.duration_seconds is None
        else item.duration_seconds,
        "b_tokens": _token_count(item.token_usage),
        "b_status": None,
        "b_error": row.error,
        "b_retry_count": row.retry_count,
        "b_attempts": row.attempts,
        "b_scheduled_at": None,
    }
    if item.how is Finish.COMPLETE:
        params["b_result"] = item.result
        return TaskStatus.COMPLETED, params, _completed_note(task, item.duration_seconds)
    cancel = bool(row.cancel_requested)
    if item.how is Finish.FAIL:
        params["b_error"] = item.error
        short = notifications.truncate_error(item.error or "failed")
        retry = not item.permanent and row.retry_count < row.max_retries
        if retry and not cancel:
            retry_at = now + timedelta(seconds=item.retry_delay)
            params.update(
                b_status=TaskStatus.PENDING,
                b_retry_count=row.retry_count + 1,
                b_scheduled_at=retry_at,
                b_completed_at=None,
            )
            note = notifications.build(
                NotificationType.RETRYING,
                task,
                f"Attempt {task.attempts} failed; retry {row.retry_count + 1} of "
                f"{row.max_retries} in {_seconds_text(item.retry_delay)} s.",
                error=short,
                retry_at=retry_at.isoformat(),
            )
            return TaskStatus.PENDING, params, note
        if not retry:
            params["b_status"] = TaskStatus.FAILED
            headline = notifications.headline(item.error or "failed")
            note = notifications.build(NotificationType.FAILED, task, headline, error=short)
            return TaskStatus.FAILED, params, note
    elif item.how is Finish.SNOOZE and not cancel:
        params.update(
            b_status=TaskStatus.PENDING,
            b_attempts=row.attempts - 1,
            b_scheduled_at=now + timedelta(seconds=item.snooze_seconds),
            b_completed_at=None,
        )
        return TaskStatus.PENDING, params, None
    params["b_status"] = TaskStatus.CANCELLED
    return TaskStatus.CANCELLED, params, _cancelled_note(task)


async def _finish_one(
    session: AsyncSession, processor_id: str, item: Finished, now: datetime | None
) -> TaskStatus | None:
    [status] = await finish_tasks(session, processor_id=processor_id, items=[item], now=now)
    return status


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
    item = Finished(
        task_id,
        attempt,
        Finish.COMPLETE,
        result=result,
        duration_seconds=duration_seconds,
        token_usage=token_usage,
    )
    return await _finish_one(session, processor_id, item, now) is not None


_FAIL_OUTCOMES = {
    TaskStatus.PENDING: FailOutcome.RETRYING,
    TaskStatus.FAILED: FailOutcome.FAILED,
    TaskStatus.CANCELLED: FailOutcome.CANCELLED,
}


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
    error is not permanent), else → failed. A job whose cancel was requested is not retried:
    it ends cancelled (or failed, when it had no retry left anyway). None when the fence
    rejected the write."""
    item = Finished(
        task_id,
        attempt,
        Finish.FAIL,
        error=error,
        permanent=permanent,
        retry_delay=retry_delay,
        duration_seconds=duration_seconds,
        token_usage=token_usage,
    )
    status = await _finish_one(session, processor_id, item, now)
    return None if status is None else _FAIL_OUTCOMES[status]


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
    item = Finished(task_id, attempt, Finish.CANCEL, duration_seconds=duration_seconds)
    return await _finish_one(session, processor_id, item, now) is not None


async def snooze_task(
    session: AsyncSession,
    *,
    task_id: int,
    processor_id: str,
    attempt: int,
    seconds: float,
    now: datetime | None = None,
) -> bool:
    """processing → pending after ``seconds``, without charging the attempt or a retry (or
    → cancelled when a cancel was requested meanwhile). False when fenced out."""
    item = Finished(task_id, attempt, Finish.SNOOZE, snooze_seconds=seconds)
    return await _finish_one(session, processor_id, item, now) is not None


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
    """Record a running job's progress (fenced), and the row's ``updated_at`` with it (a
    client polling for changes watches that); with ``notify``, also a notification."""
    stmt = (
        update(TASKS)
        .where(_fenced(task_id, processor_id, attempt))
        .values(
            progress_current=current,
            progress_total=total,
            progress_message=message,
            updated_at=now_sql(dialect_of(session)),
        )
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
    """pending → cancelled at once; processing → flagged for its daemon, which is told at
    commit and stops the job within milliseconds (at its next heartbeat, should the word
    not reach it); else FINISHED. The row is locked first: between separate statements a
    job changing state fast (snoozed, retried) had moved, and the answer was wrong
    ('requested' with no flag set, 'finished' for a pending job)."""
    current = now_sql(dialect_of(session), now)
    state = (
        await session.execute(
            select(T.status, T.cancel_requested).where(T.id == task_id).with_for_update()
        )
    ).first()
    if state is None:
        return CancelOutcome.NOT_FOUND
    if state.status == TaskStatus.PENDING:
        pending = (
            update(TASKS)
            .where(T.id == task_id, T.status == TaskStatus.PENDING)
            .values(status=TaskStatus.CANCELLED, completed_at=current, updated_at=current)
            .returning(*REF_COLUMNS)
        )
        row = (await session.execute(pending)).one()
        await notifications.add(session, [_cancelled_note(TaskRef.from_row(row))])
        return CancelOutcome.CANCELLED
    if state.status != TaskStatus.PROCESSING:
        return CancelOutcome.FINISHED
    if not state.cancel_requested:  # flagged already: its daemon was told then
        await session.execute(
            update(TASKS)
            .where(T.id == task_id, T.status == TaskStatus.PROCESSING)
            .values(cancel_requested=True, updated_at=current)
        )
        await notify_daemons(session, cancel=True)
    return CancelOutcome.REQUESTED


def _retry_values(current: ColumnElement[datetime]) -> dict[str, Any]:
    return {
        "status": TaskStatus.PENDING,
        "retry_count": 0,
        "attempts": 0,
        "scheduled_at": current,
        "updated_at": current,
        "completed_at": None,
        "started_at": None,
        "result": null(),  # SQL NULL, as before the first run (None would be JSON null)
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
        update(TASKS)
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
    return T.status == status if kind is None else and_(T.status == status, T.kind == kind)


async def count_retryable(session: AsyncSession, *, status: str, kind: str | None = None) -> int:
    """How many tasks ``retry_tasks`` would put back (for a confirmation prompt)."""
    stmt = select(func.count()).select_from(TASKS).where(_matching(status, kind))
    return int((await session.execute(stmt)).scalar_one())


async def retry_tasks(
    session: AsyncSession, *, status: str, kind: str | None = None, now: datetime | None = None
) -> int:
    """Every ``status`` (failed or cancelled) task, of ``kind`` when given, back to pending
    with a fresh retry budget; one statement. Returns how many."""
    current = now_sql(dialect_of(session), now)
    stmt = (
        update(TASKS)
        .where(_matching(status, kind))
        .values(**_retry_values(current))
        .returning(T.id)
    )
    count = len((await session.execute(stmt)).all())
    if count:
        await notify_daemons(session)
    return count


# --- maintenance -------------------------------------------------------------------------------


async def rescue_expired(
    session: AsyncSession,
    *,
    now: datetime | None = None,
    gone: Sequence[str] = (),
    spare: tuple[str, Sequence[int]] | None = None,
) -> RescueResult:
    """processing tasks whose lease expired (their daemon died or hung), and those held by
    the processors in ``gone`` (daemons seen dead on this machine, whatever their leases
    say): → failed when their attempts are spent (a poison job cannot crash-loop), else →
    pending (or cancelled, when a cancel was requested), with notifications. ``spare``: a
    live processor's id and the ids it still holds, left alone (the sweep of that very
    processor)."""
    current = now_sql(dialect_of(session), now)
    # No lease at all: only a row edited by hand, which nothing else would ever free
    lapsed: ColumnElement[bool] = or_(T.lease_expires_at < current, T.lease_expires_at.is_(None))
    error: ColumnElement[str] = literal(LEASE_EXPIRED_ERROR, String())
    if gone:
        owner_gone = T.locked_by.in_(list(gone))
        lapsed = or_(lapsed, owner_gone)
        error = case((owner_gone, DAEMON_GONE_ERROR), else_=LEASE_EXPIRED_ERROR)
    expired = and_(T.status == TaskStatus.PROCESSING, lapsed)
    if spare is not None and spare[1]:
        owner, ids = spare
        expired = and_(expired, or_(T.locked_by.is_distinct_from(owner), T.id.not_in(list(ids))))
    common = _unlocked(current)
    spent = (
        update(TASKS)
        # attempts > max_retries, not attempts >= max_retries + 1: max_retries may be
        # MAX_INT, and PostgreSQL's 32-bit + 1 then failed the whole sweep (every rescue)
        .where(expired, T.attempts > T.max_retries, T.cancel_requested.is_(False))
        .values(
            status=TaskStatus.FAILED,
            completed_at=current,
            error=error + _NO_ATTEMPTS_LEFT,
            **common,
        )
        .returning(*REF_COLUMNS, T.error)
    )
    spent_rows = (await session.execute(spent)).all()
    failed = [TaskRef.from_row(r) for r in spent_rows]
    back = (
        update(TASKS)
        .where(expired)
        .values(
            status=case((T.cancel_requested, TaskStatus.CANCELLED), else_=TaskStatus.PENDING),
            completed_at=case((T.cancel_requested, current), else_=None),
            retry_count=case(
                (or_(T.cancel_requested, T.retry_count >= MAX_INT), T.retry_count),
                else_=T.retry_count + 1,
            ),
            error=error,
            **common,
        )
        .returning(*REF_COLUMNS, T.status, T.error)
    )
    rows = (await session.execute(back)).all()
    rescued = [(TaskRef.from_row(r), r.error) for r in rows if r.status == TaskStatus.PENDING]
    cancelled = [TaskRef.from_row(r) for r in rows if r.status == TaskStatus.CANCELLED]
    reasons = [r.error.removesuffix(_NO_ATTEMPTS_LEFT) for r in spent_rows]
    notes = [
        notifications.build(NotificationType.FAILED, t, why, error=why)
        for t, why in zip(failed, reasons, strict=True)
    ]
    notes += [
        notifications.build(NotificationType.RETRYING, t, why + "; retrying.") for t, why in rescued
    ]
    notes += [_cancelled_note(t) for t in cancelled]
    await notifications.add(session, notes)
    return RescueResult(
        tuple(t.id for t, _ in rescued),
        tuple(t.id for t in failed),
        tuple(t.id for t in cancelled),
        tuple(r.id for r in [*spent_rows, *rows] if r.error.startswith(DAEMON_GONE_ERROR)),
    )


def prunable(completed_before: datetime, failed_before: datetime) -> ColumnElement[bool]:
    """The finished tasks ``prune_finished`` deletes (a condition on ``pending_analysis``)."""
    return _prunable(completed_before, failed_before)


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
        .select_from(TASKS)
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
    # SKIP LOCKED (PostgreSQL): a row a keyed enqueue holds (FOR KEY SHARE, until its
    # caller commits) waits for the next run instead of holding this batch up, or
    # deadlocking with an enqueue that waits on a row this batch deleted.
    doomed = select(T.id).where(where).limit(batch_size).with_for_update(skip_locked=True)
    if dialect_of(session) == "sqlite":  # one writer at a time
        result = await session.execute(
            delete(TASKS).where(T.id.in_(doomed.scalar_subquery())).returning(T.id)
        )
        return len(result.all())
    # PostgreSQL: their notifications go first, locked in id order, as read-all and
    # retract_started lock theirs; left to the cascade, they were locked task by task and
    # a read-all of the same unread rows could deadlock with it.
    ids = list((await session.execute(doomed)).scalars())
    if not ids:
        return 0
    bound = bindparam("ids", ids, type_=pg_array(BigInteger()))
    await session.execute(
        delete(notifications.NOTIFICATIONS).where(
            notifications.locked_in_id_order(notifications.N.task_id == any_(bound))
        )
    )
    result = await session.execute(delete(TASKS).where(T.id == any_(bound)).returning(T.id))
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
    host_key: str | None = None,
) -> None:
    """Insert this daemon's processors row (state running)."""
    current = now_sql(dialect_of(session))
    await session.execute(
        insert(PROCESSORS).values(
            id=processor_id,
            hostname=hostname,
            host_key=host_key,
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
        update(PROCESSORS).where(P.id == processor_id).values(**values).returning(P.id)
    )
    return result.first() is not None


#: A processors row silent for this many leases belonged to a daemon that died: the rescuer
#: marks it stopped, and the status views stop counting it live.
DEAD_PROCESSOR_LEASES = 3


def processor_silent(dialect: str, silent_seconds: float) -> ColumnElement[bool]:
    """A processors row whose last heartbeat is older than ``silent_seconds`` by the
    database's clock (each daemon writes last_seen_at by the database's clock too)."""
    return P.last_seen_at < later_sql(dialect, -silent_seconds)


async def reap_processors(
    session: AsyncSession, *, silent_seconds: float, gone: Sequence[str] = ()
) -> int:
    """Mark processors silent for ``silent_seconds``, and those in ``gone`` (seen dead on
    this machine), as stopped."""
    dead: ColumnElement[bool] = processor_silent(dialect_of(session), silent_seconds)
    if gone:
        dead = or_(dead, P.id.in_(list(gone)))
    result = await session.execute(
        update(PROCESSORS)
        .where(P.state != ProcessorState.STOPPED, dead)
        .values(state=ProcessorState.STOPPED, in_flight=0)
        .returning(P.id)
    )
    return len(result.all())


async def count_prunable_processors(session: AsyncSession, *, stopped_before: datetime) -> int:
    """How many rows ``prune_processors`` would delete."""
    stmt = select(func.count()).where(
        P.state == ProcessorState.STOPPED, P.last_seen_at < stopped_before
    )
    return int((await session.execute(stmt)).scalar_one())


async def prune_processors(
    session: AsyncSession, *, stopped_before: datetime, batch_size: int = PRUNE_BATCH_SIZE
) -> int:
    """Delete up to ``batch_size`` rows of processors that stopped (or were found dead) and
    were last seen before ``stopped_before``: every daemon start leaves one row, and they
    piled up for good. Returns how many."""
    doomed = (
        select(P.id)
        .where(P.state == ProcessorState.STOPPED, P.last_seen_at < stopped_before)
        .limit(batch_size)
    )
    result = await session.execute(
        delete(PROCESSORS).where(P.id.in_(doomed.scalar_subquery())).returning(P.id)
    )
    return len(result.all())


async def prune_task_starts(
    session: AsyncSession, *, started_before: datetime, batch_size: int = PRUNE_BATCH_SIZE
) -> int:
    """Delete up to ``batch_size`` rate-limit starts older than ``started_before`` (the
    pruner: past retention and past the longest window a limit may have). A claim of a
    rate-limited kind deletes its kind's starts past the window; a kind whose limit was
    removed kept its last window's for good. Returns how many."""
    doomed = select(STARTS.c.id).where(STARTS.c.started_at < started_before).limit(batch_size)
    result = await session.execute(
        delete(STARTS).where(STARTS.c.id.in_(doomed.scalar_subquery())).returning(STARTS.c.id)
    )
    return len(result.all())


async def processors_on_host(
    session: AsyncSession, *, host_key: str, hostname: str, besides: str
) -> list[tuple[str, int]]:
    """(id, pid) of the processors not stopped that run where ``host_key`` and ``hostname``
    say (same boot, same PID namespace, same name: app.services.processor.host), other
    than ``besides``."""
    rows = await session.execute(
        select(P.id, P.pid).where(
            P.host_key == host_key,
            P.hostname == hostname,
            P.state != ProcessorState.STOPPED,
            P.id != besides,
        )
    )
    return [(row.id, row.pid) for row in rows]


# --- reads -----------------------------------------------------------------------------------


async def get_task(
    session: AsyncSession, task_id: int, *, user_id: str | None = None
) -> PendingAnalysis | None:
    """One task; with ``user_id``, only if it belongs to that user."""
    if user_id is None:
        return (await session.scalars(_TASK_BY_ID, {"task_id": task_id})).first()
    params = {"task_id": task_id, "user_id": user_id}
    return (await session.scalars(_USERS_TASK_BY_ID, params)).first()


# Built once (the API reads a task on every status poll and after every enqueue).
_TASK_BY_ID = select(PendingAnalysis).where(T.id == bindparam("task_id"))
_USERS_TASK_BY_ID = _TASK_BY_ID.where(T.user_id == bindparam("user_id"))


async def read_task(db: Database, task_id: int, *, user_id: str | None = None) -> Any | None:
    """``get_task`` as a read of its own, on the bare driver where it can
    (``Database.read_alone``: a frontend polls GET /tasks/{id}): the row (every column by
    name), or None."""
    params: dict[str, Any]
    if user_id is None:
        stmt, params = _TASK_ROW_BY_ID, {"task_id": task_id}
    else:
        stmt, params = _USERS_TASK_ROW_BY_ID, {"task_id": task_id, "user_id": user_id}
    rows = await _read_task_rows(db, stmt, params, scans=False)
    return rows[0] if rows else None


_TASK_ROW_BY_ID = select(*TASKS.c).where(TASKS.c.id == bindparam("task_id"))
_USERS_TASK_ROW_BY_ID = _TASK_ROW_BY_ID.where(TASKS.c.user_id == bindparam("user_id"))


async def get_tasks(session: AsyncSession, task_ids: Sequence[int]) -> list[PendingAnalysis | None]:
    """Tasks by id, in the order asked (None where there is none), in one SELECT per 1,000."""
    found: dict[int, PendingAnalysis] = {}
    unique = list(dict.fromkeys(task_ids))
    for start in range(0, len(unique), 1_000):
        chunk = unique[start : start + 1_000]
        rows = await session.scalars(select(PendingAnalysis).where(T.id.in_(chunk)))
        found.update({row.id: row for row in rows})
    return [found.get(task_id) for task_id in task_ids]


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
) -> list[Any]:
    """Newest first; ``before_id`` is the cursor (the last id of the previous page). Rows
    with every column of the task by name."""
    stmt, params = _listing(user_id, status, kind, project_id, chapter_id, before_id, limit)
    try:
        return list((await session.execute(stmt, params)).all())
    except readable.UNREADABLE_ERRORS:
        return await _readable_task_rows(session, stmt, params)


async def read_tasks(
    db: Database,
    *,
    user_id: str | None = None,
    status: str | None = None,
    kind: str | None = None,
    project_id: str | None = None,
    chapter_id: str | None = None,
    before_id: int | None = None,
    limit: int = 50,
) -> list[Any]:
    """``list_tasks`` as a read of its own, on the bare driver where it can
    (``Database.read_alone``; GET /tasks and a chapter's latest task, which frontends and
    the dashboard poll)."""
    stmt, params = _listing(user_id, status, kind, project_id, chapter_id, before_id, limit)
    return await _read_task_rows(db, stmt, params, scans=True)


async def _read_task_rows(
    db: Database, stmt: Select[Any], params: dict[str, Any], *, scans: bool
) -> list[Any]:
    """The rows of a SELECT of every task column, on the bare driver where it can; rows a
    hand edit left unreadable come back value by value (app.services.readable)."""
    try:
        rows = await db.read_alone(stmt, params, scans=scans)
        if rows is None:
            async with db.read_transaction() as session:
                rows = list((await session.execute(stmt, params)).all())
    except readable.UNREADABLE_ERRORS:
        async with db.read_transaction() as session:
            return await _readable_task_rows(session, stmt, params)
    return rows


async def _readable_task_rows(
    session: AsyncSession, stmt: Select[Any], params: dict[str, Any]
) -> list[Any]:
    """``stmt``'s rows read again undecoded, each value read alone."""
    raw = stmt.with_only_columns(*readable.raw_columns(TASKS.c, dialect_of(session)))
    return [readable.readable(TASKS.c, row) for row in (await session.execute(raw, params)).all()]


async def task_rows(
    session: AsyncSession, task_ids: Sequence[int], *, user_id: str | None = None
) -> list[Any]:
    """Tasks by id as rows of every column (``user_id``: only that user's), in the order
    asked (None where there is none), in one SELECT per 1,000; read as ``read_tasks``
    reads them, whatever a hand edit left in a row."""
    found: dict[int, Any] = {}
    unique = list(dict.fromkeys(task_ids))
    for start in range(0, len(unique), 1_000):
        stmt = select(*TASKS.c).where(TASKS.c.id.in_(unique[start : start + 1_000]))
        if user_id is not None:
            stmt = stmt.where(TASKS.c.user_id == user_id)
        try:
            rows = list((await session.execute(stmt)).all())
        except readable.UNREADABLE_ERRORS:
            rows = await _readable_task_rows(session, stmt, {})
        found.update({row.id: row for row in rows})
    return [found.get(task_id) for task_id in task_ids]


def _listing(
    user_id: str | None,
    status: str | None,
    kind: str | None,
    project_id: str | None,
    chapter_id: str | None,
    before_id: int | None,
    limit: int,
) -> tuple[Any, dict[str, Any]]:
    filters = {
        "user_id": user_id,
        "status": status,
        "kind": kind,
        "project_id": project_id,
        "chapter_id": chapter_id,
        "before_id": before_id,
    }
    params = {name: value for name, value in filters.items() if value is not None}
    return _list_statement(tuple(params)), {**params, "limit": limit}


@functools.cache
def _list_statement(filters: tuple[str, ...]) -> Any:
    """A task list's SELECT for one combination of filters, built once (it is polled)."""
    stmt = select(*TASKS.c)
    for name in filters:
        if name == "before_id":
            stmt = stmt.where(TASKS.c.id < bindparam("before_id"))
        else:
            stmt = stmt.where(TASKS.c[name] == bindparam(name))
    return stmt.order_by(TASKS.c.id.desc()).limit(bindparam("limit", type_=Integer))


async def latest_for_chapter(
    session: AsyncSession, chapter_id: str, *, user_id: str | None = None
) -> Any | None:
    """The newest task of a chapter (of that user, when given)."""
    tasks = await list_tasks(session, chapter_id=chapter_id, user_id=user_id, limit=1)
    return tasks[0] if tasks else None


def is_finished(status: str) -> bool:
    """True for completed, failed and cancelled."""
    return status in FINISHED_STATUSES


# --- queues: pause and resume ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueSwitch:
    """A queue's pause switch as stored."""

    name: str
    paused: bool
    updated_at: datetime
    updated_by: str | None


async def set_queue_paused(
    session: AsyncSession,
    name: str,
    *,
    paused: bool,
    by: str | None = None,
    now: datetime | None = None,
) -> QueueSwitch:
    """Pause (or resume) ``name`` for every daemon at once: daemons claim nothing from a
    paused queue; running jobs finish. Resuming wakes the daemons."""
    check_queue_name(name)
    dialect = dialect_of(session)
    current = now_sql(dialect, now)
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(QUEUE_STATES)
    stmt = (
        ins.values(name=name, paused=paused, updated_at=current, updated_by=by)
        .on_conflict_do_update(
            index_elements=[QUEUE_STATES.c.name],
            set_={"paused": paused, "updated_at": current, "updated_by": by},
        )
        .returning(*QUEUE_STATES.c)
    )
    row = (await session.execute(stmt)).one()
    if not paused:
        await notify_daemons(session)
    return QueueSwitch(row.name, row.paused, row.updated_at, row.updated_by)


async def queue_switches(session: AsyncSession) -> dict[str, QueueSwitch]:
    """Every queue that has a switch row (paused or resumed), by name."""
    rows = (await session.execute(select(*QUEUE_STATES.c).order_by(QUEUE_STATES.c.name))).all()
    return {r.name: QueueSwitch(r.name, r.paused, r.updated_at, r.updated_by) for r in rows}


async def queue_depths(session: AsyncSession) -> dict[str, dict[str, int]]:
    """Pending and processing counts per queue, each read through its partial index (one
    count per status, with the status as a literal so that both engines match the index's
    predicate; an IN list would scan the table)."""
    depths: dict[str, dict[str, int]] = {}
    for status in (TaskStatus.PENDING, TaskStatus.PROCESSING):
        literal_status = literal_column(f"'{status.value}'", String())
        stmt = select(T.queue, func.count()).where(T.status == literal_status).group_by(T.queue)
        for name, n in (await session.execute(stmt)).all():
            # a name written by hand as bytes or a number (SQLite) as text: it is sorted
            # with the others and shown
            depths.setdefault(readable.as_text(name), {})[status.value] = n
    return depths


async def queue_overview(session: AsyncSession) -> list[dict[str, Any]]:
    """Every queue with live tasks or a pause switch: paused or not, pending and
    processing counts, and who changed the switch last."""
    switches = await queue_switches(session)
    depths = await queue_depths(session)
    rows = []
    for name in sorted({*switches, *depths}):
        switch = switches.get(name)
        rows.append(
            {
                "queue": name,
                "paused": switch is not None and switch.paused,
                "pending": depths.get(name, {}).get(TaskStatus.PENDING, 0),
                "processing": depths.get(name, {}).get(TaskStatus.PROCESSING, 0),
                "changed_at": switch and switch.updated_at,
                "changed_by": switch and switch.updated_by,
            }
        )
    return rows


async def flow_limits(
    session: AsyncSession,
    rate_limits: Sequence[RateLimit],
    key_limits: Sequence[KeyLimit],
    *,
    now: datetime | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The configured rate limits with the starts in their current window (by the
    database's clock on PostgreSQL, which stamped the starts), and the per-key limits, for
    status displays."""
    dialect = dialect_of(session)
    rates = []
    for limit in rate_limits:
        used = await session.scalar(
            select(func.count()).where(
                STARTS.c.kind == limit.kind,
                STARTS.c.started_at > later_sql(dialect, -limit.seconds, now),
            )
        )
        rates.append(
            {"kind": limit.kind, "count": limit.count, "per_seconds": limit.seconds, "used": used}
        )
    keys = [{"kind": k.kind, "column": k.column, "limit": k.limit} for k in key_limits]
    return {"rate_limits": rates, "key_limits": keys}
