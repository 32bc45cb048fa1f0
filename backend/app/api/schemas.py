"""Request and response models: Pydantic lives here, at the HTTP edge, and nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from types import SimpleNamespace
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from app.config import QUEUE_NAME_PATTERN, QUEUE_NAME_RULE, is_queue_name
from app.models import AnalysisNotification, PendingAnalysis
from app.services import notifications, queue, readable
from app.services.schedules import RESERVED_KEY_RULE, is_tick_key
from app.text import NUMBER

#: No NUL (U+0000) in any string the API stores: PostgreSQL's text and jsonb cannot hold it,
#: so neither engine takes it (422, naming the field). Declared as each string's pattern.
NO_NUL = r"^[^\x00]*$"
#: The OpenAPI component (added by app.api.main) that types a payload's values.
JSON_VALUE = "JsonValue"
JSON_VALUE_SCHEMA: dict[str, Any] = {
    "description": "Any JSON value whose strings and object keys contain no NUL character",
    "anyOf": [
        {"type": "string", "pattern": NO_NUL},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "array", "items": {"$ref": f"#/components/schemas/{JSON_VALUE}"}},
        {
            "type": "object",
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": {"$ref": f"#/components/schemas/{JSON_VALUE}"},
        },
    ],
}
PAYLOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"pattern": NO_NUL},
    "additionalProperties": {"$ref": f"#/components/schemas/{JSON_VALUE}"},
    "description": "The handler's input: a JSON object (no NUL characters in its strings)",
}
# JSON text always writes a NUL as \u0000. After an even run of backslashes (escaped
# backslashes) that is a NUL; after an odd run it is the literal text "\u0000".
has_nul = queue.has_nul

_NUMBER = NUMBER


class TaskCreate(BaseModel):
    """A task to enqueue."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=100, pattern=NO_NUL)
    payload: Annotated[dict[str, Any], WithJsonSchema(PAYLOAD_SCHEMA)] = Field(default_factory=dict)
    priority: int = Field(default=queue.DEFAULT_PRIORITY, ge=1, le=10)
    max_retries: int | None = Field(default=None, ge=0, le=queue.USER_MAX_RETRIES)
    timeout_seconds: int | None = Field(default=None, gt=0, le=queue.USER_MAX_TIMEOUT_SECONDS)
    scheduled_at: datetime | None = Field(default=None, description="Not before (ISO 8601)")
    queue: str = Field(
        default=queue.DEFAULT_QUEUE,
        min_length=1,
        max_length=100,
        json_schema_extra={"pattern": QUEUE_NAME_PATTERN},
        description=f"The queue's name: {QUEUE_NAME_RULE}.",
    )
    project_id: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NUL)
    chapter_id: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NUL)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255, pattern=NO_NUL)
    user_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        pattern=NO_NUL,
        description="Admin tokens only: the user to enqueue for (a user token sending it gets"
        " 422; its tasks are its own)",
    )

    @field_validator("priority", "max_retries", "timeout_seconds", mode="before")
    @classmethod
    def _json_integers(cls, value: object) -> object:
        # JSON integers only: true, "5" and 2.5 are not numbers here (5.0 is).
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if value is not None and (isinstance(value, bool) or not integral):
            raise ValueError("must be a JSON integer")
        return value

    @field_validator(
        "kind", "queue", "project_id", "chapter_id", "idempotency_key", "user_id", mode="before"
    )
    @classmethod
    def _json_strings(cls, value: object) -> object:
        if value is not None and not isinstance(value, str):
            raise ValueError("must be a string")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _not_a_tick_key(cls, value: str | None) -> str | None:
        if value is not None and is_tick_key(value):
            raise ValueError(RESERVED_KEY_RULE)
        return value

    @field_validator("queue")
    @classmethod
    def _queue_name(cls, value: str) -> str:
        if not is_queue_name(value):
            raise ValueError(f"a queue's name is {QUEUE_NAME_RULE}")
        return value

    @field_validator("payload")
    @classmethod
    def _no_nul(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Depth first: a payload nested ~950 deep made has_nul's json.dumps raise
        # RecursionError (a 500); TaskSpec says the same when it checks it again.
        if queue.nests_deeper_than(value, queue.MAX_JSON_DEPTH):
            raise ValueError(
                f"payload nests objects and arrays more than {queue.MAX_JSON_DEPTH} levels deep"
            )
        if has_nul(value):
            raise ValueError("strings and keys must not contain NUL (\\u0000) characters")
        return value

    @field_validator("scheduled_at", mode="before")
    @classmethod
    def _iso_only(cls, value: object) -> object:
        # pydantic would also read a number, or a string of digits, as Unix time
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("must be an ISO 8601 date-time string")
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            raise ValueError("must be an ISO 8601 date-time string, not a number")
        return value


class BulkCreate(BaseModel):
    """Up to 1,000 tasks, all or nothing."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskCreate] = Field(min_length=1, max_length=1000)


class Progress(BaseModel):
    """Where a running task is."""

    current: int | None
    total: int | None
    message: str | None
    percent: float | None


UNREADABLE_DESCRIPTION = (
    "The fields whose stored value could not be read (a row edited by hand into a value"
    " its column's type cannot hold: text in a number, a date before year 1, JSON that"
    " does not parse); each is null here. Empty for every row the service wrote."
)


def _unreadable_of(row: Any) -> list[str]:
    return list(row.unreadable) if isinstance(row, SimpleNamespace) else []


Shown = TypeVar("Shown", bound=BaseModel)


def _shown(
    row: Any,
    columns: list[Any],
    document: str,
    build: Callable[[Any, list[str]], Shown],
) -> Shown:
    """``build(row, unreadable)``; when a value does not fit its field (SQLite keeps 5.5 in
    a priority, text in a count), each value read alone (readable.readable), the
    unreadable ones null; ``document`` (a JSON object column) null unless an object."""
    try:
        return build(row, _unreadable_of(row))
    except (ValidationError, *readable.UNREADABLE_ERRORS):
        values = readable.readable(columns, row)
        unreadable = _unreadable_of(row) + values.unreadable
        if not isinstance(getattr(values, document), dict | None):
            setattr(values, document, None)
            unreadable.append(document)
        return build(values, unreadable)


class TaskPublic(BaseModel):
    """A task as its owner sees it. A field whose stored value cannot be read is null and
    named in ``unreadable`` (only a row edited by hand has one); the rest show as stored."""

    id: int
    kind: str | None
    queue: str | None
    status: str | None
    priority: int | None
    payload: dict[str, Any] | None
    result: Any
    error: str | None
    attempts: int | None
    retry_count: int | None
    max_retries: int | None
    timeout_seconds: int | None
    user_id: str | None
    project_id: str | None
    chapter_id: str | None
    idempotency_key: str | None
    cancel_requested: bool | None
    locked_by: str | None
    progress: Progress
    created_at: datetime | None
    scheduled_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime | None
    duration_seconds: float | None
    token_usage: int | None
    unreadable: list[str] = Field(default_factory=list, description=UNREADABLE_DESCRIPTION)

    @classmethod
    def of(cls, t: Any) -> TaskPublic:
        """From a row (an ORM object, a row of every column, or one read value by value)."""
        return _shown(t, TASK_COLUMNS, "payload", cls._of)

    @classmethod
    def _of(cls, t: Any, unreadable: list[str]) -> TaskPublic:
        # named as the fields show them; a column the task does not show is left out
        unreadable = [_TASK_FIELD_OF.get(c, c) for c in unreadable]
        unreadable = [f for f in unreadable if f in cls.model_fields or f.startswith("progress.")]
        progress = Progress(
            current=t.progress_current,
            total=t.progress_total,
            message=t.progress_message,
            percent=notifications.percent(t.progress_current, t.progress_total),
        )
        fields = {name: getattr(t, name) for name in cls.model_fields if name not in _DERIVED}
        return cls(progress=progress, unreadable=sorted(set(unreadable)), **fields)


_DERIVED = frozenset({"progress", "unreadable"})
_TASK_FIELD_OF = {
    "progress_current": "progress.current",
    "progress_total": "progress.total",
    "progress_message": "progress.message",
}
TASK_COLUMNS = list(PendingAnalysis.__table__.columns)
NOTIFICATION_COLUMNS = list(AnalysisNotification.__table__.columns)


class TaskPage(BaseModel):
    """A page of tasks, newest first; pass next_cursor as cursor for the next page."""

    items: list[TaskPublic]
    next_cursor: int | None


class BulkResult(BaseModel):
    """The tasks a bulk enqueue created (or found by idempotency key), in input order."""

    tasks: list[TaskPublic]
    created: list[bool] = Field(
        default_factory=list,
        description="For each item, in input order: true when this call created its task,"
        " false when its idempotency_key named an existing one (or an earlier item's)",
    )


class NotificationPublic(BaseModel):
    """A notification."""

    id: int
    task_id: int | None
    user_id: str | None
    project_id: str | None
    chapter_id: str | None
    type: str | None
    title: str | None
    message: str | None
    data: dict[str, Any] | None
    is_read: bool | None
    created_at: datetime | None
    read_at: datetime | None
    unreadable: list[str] = Field(default_factory=list, description=UNREADABLE_DESCRIPTION)

    @classmethod
    def of(cls, n: Any) -> NotificationPublic:
        """From a row (as ``TaskPublic.of``)."""
        return _shown(n, NOTIFICATION_COLUMNS, "data", cls._of)

    @classmethod
    def _of(cls, n: Any, unreadable: list[str]) -> NotificationPublic:
        fields = {name: getattr(n, name) for name in cls.model_fields if name != "unreadable"}
        return cls.model_validate({**fields, "unreadable": sorted(set(unreadable))})


class NotificationPage(BaseModel):
    """Notifications and the caller's unread count."""

    items: list[NotificationPublic]
    unread_count: int


class Marked(BaseModel):
    """How many notifications were marked read."""

    marked: int


class Problem(BaseModel):
    """Every error: a JSON object with a detail."""

    detail: Any
