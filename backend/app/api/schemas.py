"""Request and response models: Pydantic lives here, at the HTTP edge, and nowhere else."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.models import AnalysisNotification, PendingAnalysis
from app.services import notifications, queue


class TaskCreate(BaseModel):
    """A task to enqueue."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=100)
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: int = Field(default=queue.DEFAULT_PRIORITY, ge=1, le=10)
    max_retries: int | None = Field(default=None, ge=0, le=1000)
    timeout_seconds: int | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    scheduled_at: datetime | None = Field(default=None, description="Not before (ISO 8601)")
    queue: str = Field(default=queue.DEFAULT_QUEUE, min_length=1, max_length=100)
    project_id: str | None = Field(default=None, min_length=1, max_length=255)
    chapter_id: str | None = Field(default=None, min_length=1, max_length=255)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    user_id: str | None = Field(default=None, min_length=1, max_length=255)

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

    @field_validator("scheduled_at", mode="before")
    @classmethod
    def _iso_only(cls, value: object) -> object:
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("must be an ISO 8601 date-time string")
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


class TaskPublic(BaseModel):
    """A task as its owner sees it."""

    id: int
    kind: str
    queue: str
    status: str
    priority: int
    payload: dict[str, Any]
    result: Any
    error: str | None
    attempts: int
    retry_count: int
    max_retries: int
    timeout_seconds: int
    user_id: str | None
    project_id: str | None
    chapter_id: str | None
    idempotency_key: str | None
    cancel_requested: bool
    locked_by: str | None
    progress: Progress
    created_at: datetime
    scheduled_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    updated_at: datetime
    duration_seconds: float | None
    token_usage: int

    @classmethod
    def of(cls, t: PendingAnalysis) -> TaskPublic:
        """From a row."""
        progress = Progress(
            current=t.progress_current,
            total=t.progress_total,
            message=t.progress_message,
            percent=notifications.percent(t.progress_current, t.progress_total),
        )
        fields = {name: getattr(t, name) for name in cls.model_fields if name != "progress"}
        return cls(progress=progress, **fields)


class TaskPage(BaseModel):
    """A page of tasks, newest first; pass next_cursor as cursor for the next page."""

    items: list[TaskPublic]
    next_cursor: int | None


class BulkResult(BaseModel):
    """The tasks a bulk enqueue created (or found by idempotency key), in input order."""

    tasks: list[TaskPublic]


class NotificationPublic(BaseModel):
    """A notification."""

    id: int
    task_id: int | None
    user_id: str | None
    project_id: str | None
    chapter_id: str | None
    type: str
    title: str
    message: str
    data: dict[str, Any] | None
    is_read: bool
    created_at: datetime
    read_at: datetime | None

    @classmethod
    def of(cls, n: AnalysisNotification) -> NotificationPublic:
        """From a row."""
        return cls.model_validate({name: getattr(n, name) for name in cls.model_fields})


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
