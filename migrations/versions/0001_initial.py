"""initial schema: tasks, notifications, processors, api tokens

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from app.models.types import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
PENDING = sa.text("status = 'pending'")
PROCESSING = sa.text("status = 'processing'")

# Wake every listening daemon when rows are inserted. PostgreSQL folds identical
# notifications of one transaction into one, so a bulk insert costs one NOTIFY.
NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION async_processor_notify_insert() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('async_processor_tasks', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""
NOTIFY_TRIGGER = """
CREATE TRIGGER pending_analysis_notify_insert
AFTER INSERT ON pending_analysis
FOR EACH STATEMENT EXECUTE FUNCTION async_processor_notify_insert()
"""


def _create_tasks() -> None:
    op.create_table(
        "pending_analysis",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("result", JSONType, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("retry_count", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=True),
        sa.Column("project_id", sa.String(255), nullable=True),
        sa.Column("chapter_id", sa.String(255), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("scheduled_at", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("locked_by", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("progress_current", sa.Integer(), nullable=True),
        sa.Column("progress_total", sa.Integer(), nullable=True),
        sa.Column("progress_message", sa.Text(), nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.Column("token_usage", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_pending_analysis_status_valid"),
        ),
        sa.CheckConstraint(
            "priority BETWEEN 1 AND 10", name=op.f("ck_pending_analysis_priority_range")
        ),
        sa.CheckConstraint(
            "timeout_seconds > 0", name=op.f("ck_pending_analysis_timeout_positive")
        ),
        sa.CheckConstraint(
            "max_retries >= 0", name=op.f("ck_pending_analysis_max_retries_nonnegative")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pending_analysis")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_pending_analysis_idempotency_key")),
        sqlite_autoincrement=True,
    )
    for column in ("user_id", "project_id", "chapter_id", "completed_at"):
        op.create_index(f"ix_pending_analysis_{column}", "pending_analysis", [column])
    not_pending = sa.text("status <> 'pending'")
    op.create_index(
        "ix_pending_analysis_status",
        "pending_analysis",
        ["status"],
        postgresql_where=not_pending,
        sqlite_where=not_pending,
    )
    op.create_index(
        "ix_pending_analysis_claim",
        "pending_analysis",
        ["queue", sa.text("priority DESC"), "scheduled_at", "id"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.create_index(
        "ix_pending_analysis_claim_any",
        "pending_analysis",
        [sa.text("priority DESC"), "scheduled_at", "id"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.create_index(
        "ix_pending_analysis_lease",
        "pending_analysis",
        ["lease_expires_at"],
        postgresql_where=PROCESSING,
        sqlite_where=PROCESSING,
    )
    op.create_index(
        "ix_pending_analysis_locked_by",
        "pending_analysis",
        ["locked_by"],
        postgresql_where=PROCESSING,
        sqlite_where=PROCESSING,
    )


def _create_notifications() -> None:
    op.create_table(
        "analysis_notifications",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(255), nullable=True),
        sa.Column("project_id", sa.String(255), nullable=True),
        sa.Column("chapter_id", sa.String(255), nullable=True),
        sa.Column("task_id", BigId, nullable=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", JSONType, nullable=True),
        sa.Column("is_read", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("read_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint(
            "type IN ('started', 'progress', 'retrying', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_analysis_notifications_type_valid"),
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["pending_analysis.id"],
            name=op.f("fk_analysis_notifications_task_id_pending_analysis"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analysis_notifications")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_analysis_notifications_task_id", "analysis_notifications", ["task_id"])
    op.create_index(
        "ix_analysis_notifications_feed",
        "analysis_notifications",
        ["user_id", "is_read", sa.text("created_at DESC")],
    )


def _create_processors_and_tokens() -> None:
    op.create_table(
        "processors",
        sa.Column("id", sa.String(255), nullable=False),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(50), nullable=False),
        sa.Column("queues", sa.String(1000), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("in_flight", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("processed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "state IN ('running', 'draining', 'stopped')", name=op.f("ck_processors_state_valid")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_processors")),
    )
    op.create_index("ix_processors_last_seen_at", "processors", ["last_seen_at"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])


def upgrade() -> None:
    _create_tasks()
    _create_notifications()
    _create_processors_and_tokens()
    if op.get_bind().dialect.name == "postgresql":
        op.execute(NOTIFY_FUNCTION)
        op.execute(NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS pending_analysis_notify_insert ON pending_analysis")
        op.execute("DROP FUNCTION IF EXISTS async_processor_notify_insert()")
    op.drop_table("api_tokens")
    op.drop_table("processors")
    op.drop_table("analysis_notifications")
    op.drop_table("pending_analysis")
