"""The queue table (pending_analysis) and the notifications a frontend polls."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base
from app.models.types import JSONType, UTCDateTime, utcnow

#: BIGINT on PostgreSQL, INTEGER (the rowid) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class TaskStatus(StrEnum):
    """Where a task is in its life cycle."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATUSES = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)
#: The finished rows, as SQL text: the predicate of the partial index over them. Queries that
#: should read that index repeat it word for word (SQLite matches partial-index predicates by
#: their terms, and PostgreSQL cannot prove a bound parameter's value in a generic plan).
FINISHED_WHERE = f"status IN ({', '.join(repr(s.value) for s in FINISHED_STATUSES)})"


class NotificationType(StrEnum):
    """What happened to a task, as its owner sees it."""

    STARTED = "started"
    PROGRESS = "progress"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The predicate of the partial index over unread notifications, as each engine writes
#: ``is_read == false()``.
UNREAD_WHERE = {"postgresql": "is_read = false", "sqlite": "is_read = 0"}


def _in_list(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class PendingAnalysis(Base):
    """One job. The queue is this table."""

    __tablename__ = "pending_analysis"
    __table_args__ = (
        CheckConstraint(_in_list("status", TaskStatus), name="status_valid"),
        CheckConstraint("priority BETWEEN 1 AND 10", name="priority_range"),
        CheckConstraint("timeout_seconds > 0", name="timeout_positive"),
        CheckConstraint("max_retries >= 0", name="max_retries_nonnegative"),
        # The claim reads only pending rows, so its cost does not grow with history.
        Index(
            "ix_pending_analysis_claim",
            "queue",
            text("priority DESC"),
            "scheduled_at",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index(
            "ix_pending_analysis_claim_any",
            text("priority DESC"),
            "scheduled_at",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # Counts of finished tasks per status, queue and kind, read from the index alone (few
        # distinct keys: PostgreSQL deduplicates it to a few pages per million rows). Pending
        # and processing rows are counted through their own partial indexes, and leaving them
        # out keeps the planner on the (ordered, tiny) claim indexes for the claim.
        Index(
            "ix_pending_analysis_finished",
            "status",
            "queue",
            "kind",
            postgresql_where=text(FINISHED_WHERE),
            sqlite_where=text(FINISHED_WHERE),
        ),
        # Task lists are newest first (ORDER BY id DESC) under one filter: each filter's index
        # ends with id, so a page is read in order and stops after ``limit`` rows. A status
        # filter: failed and cancelled tasks are few, so a page of them has its own partial
        # index (SQLite matches ``status = ?`` to it by the bound value, PostgreSQL in its
        # custom plans); completed ones are most of the table, read in id order; pending and
        # processing ones through their partial indexes.
        Index(
            "ix_pending_analysis_failed",
            "id",
            postgresql_where=text("status = 'failed'"),
            sqlite_where=text("status = 'failed'"),
        ),
        Index(
            "ix_pending_analysis_cancelled",
            "id",
            postgresql_where=text("status = 'cancelled'"),
            sqlite_where=text("status = 'cancelled'"),
        ),
        Index("ix_pending_analysis_kind", "kind", "id"),
        # The three filter columns are often NULL, and a list filtered by one (``col = ?``)
        # never reads those rows: their indexes hold only the rows that have a value, so a
        # claim or a completion of a job without one (each a non-HOT update) skips them.
        *(
            Index(
                f"ix_pending_analysis_{column}",
                column,
                "id",
                postgresql_where=text(f"{column} IS NOT NULL"),
                sqlite_where=text(f"{column} IS NOT NULL"),
            )
            for column in ("user_id", "project_id", "chapter_id")
        ),
        # Finished rows by completion time (the last hour's figures, pruning): every read is a
        # range of times, and unfinished rows (no time yet) are left out, so neither an
        # enqueue nor a claim writes an entry here.
        Index(
            "ix_pending_analysis_completed_at",
            "completed_at",
            postgresql_where=text("completed_at IS NOT NULL"),
            sqlite_where=text("completed_at IS NOT NULL"),
        ),
        # Heartbeat and rescuer read only running rows.
        Index(
            "ix_pending_analysis_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'processing'"),
            sqlite_where=text("status = 'processing'"),
        ),
        Index(
            "ix_pending_analysis_locked_by",
            "locked_by",
            postgresql_where=text("status = 'processing'"),
            sqlite_where=text("status = 'processing'"),
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(100))
    queue: Mapped[str] = mapped_column(String(100), default="default")
    status: Mapped[str] = mapped_column(String(16), default=TaskStatus.PENDING)
    priority: Mapped[int] = mapped_column(SmallInteger, default=5)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    result: Mapped[Any | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    max_retries: Mapped[int] = mapped_column(Integer, default=3)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    timeout_seconds: Mapped[int] = mapped_column(Integer, default=600)
    user_id: Mapped[str | None] = mapped_column(String(255))
    project_id: Mapped[str | None] = mapped_column(String(255))
    chapter_id: Mapped[str | None] = mapped_column(String(255))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    scheduled_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    locked_by: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    progress_current: Mapped[int | None] = mapped_column(Integer)
    progress_total: Mapped[int | None] = mapped_column(Integer)
    progress_message: Mapped[str | None] = mapped_column(Text)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    token_usage: Mapped[int] = mapped_column(Integer, default=0)


class AnalysisNotification(Base):
    """A message to a task's owner, written in the same transaction as the change."""

    __tablename__ = "analysis_notifications"
    __table_args__ = (
        CheckConstraint(_in_list("type", NotificationType), name="type_valid"),
        Index(
            "ix_analysis_notifications_feed",
            "user_id",
            "is_read",
            text("created_at DESC"),
        ),
        # A user's feed page by id (newest first, or after an id): a range read in order.
        Index(
            "ix_analysis_notifications_user_id",
            "user_id",
            "id",
            postgresql_where=text("user_id IS NOT NULL"),
            sqlite_where=text("user_id IS NOT NULL"),
        ),
        # Unread notifications only: the unread count of every user (an admin's) stays small.
        Index(
            "ix_analysis_notifications_unread",
            "user_id",
            postgresql_where=text(UNREAD_WHERE["postgresql"]),
            sqlite_where=text(UNREAD_WHERE["sqlite"]),
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    user_id: Mapped[str | None] = mapped_column(String(255))
    project_id: Mapped[str | None] = mapped_column(String(255))
    chapter_id: Mapped[str | None] = mapped_column(String(255))
    task_id: Mapped[int | None] = mapped_column(
        BigId, ForeignKey("pending_analysis.id", ondelete="CASCADE"), index=True
    )
    type: Mapped[str] = mapped_column(String(16))
    title: Mapped[str] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    is_read: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
