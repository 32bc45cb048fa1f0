"""read-path indexes: finished counts from one index, task lists in id order per filter
(failed and cancelled pages from their own partial indexes), unread notifications

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23

The admin /status, /metrics and the dashboard counted tasks with a GROUP BY over the whole
table, and lists filtered by kind had no index (docs/operations.md, "The dashboard and
/status at scale"). On PostgreSQL the indexes are built in the migration's transaction, which
holds writes on the table while it runs: about a second per index per million rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASKS = "pending_analysis"
NOTIFICATIONS = "analysis_notifications"
FINISHED = sa.text("status IN ('completed', 'failed', 'cancelled')")
NOT_PENDING = sa.text("status <> 'pending'")
FILTERS = ("user_id", "project_id", "chapter_id")


def upgrade() -> None:
    op.drop_index("ix_pending_analysis_status", table_name=TASKS)
    op.create_index(
        "ix_pending_analysis_finished",
        TASKS,
        ["status", "queue", "kind"],
        postgresql_where=FINISHED,
        sqlite_where=FINISHED,
    )
    for status in ("failed", "cancelled"):
        only = sa.text(f"status = '{status}'")
        op.create_index(
            f"ix_pending_analysis_{status}", TASKS, ["id"], postgresql_where=only, sqlite_where=only
        )
    op.create_index("ix_pending_analysis_kind", TASKS, ["kind", "id"])
    for column in FILTERS:
        op.drop_index(f"ix_pending_analysis_{column}", table_name=TASKS)
        op.create_index(f"ix_pending_analysis_{column}", TASKS, [column, "id"])
    op.create_index(
        "ix_analysis_notifications_unread",
        NOTIFICATIONS,
        ["user_id"],
        postgresql_where=sa.text("is_read = false"),
        sqlite_where=sa.text("is_read = 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_analysis_notifications_unread", table_name=NOTIFICATIONS)
    for column in FILTERS:
        op.drop_index(f"ix_pending_analysis_{column}", table_name=TASKS)
        op.create_index(f"ix_pending_analysis_{column}", TASKS, [column])
    op.drop_index("ix_pending_analysis_kind", table_name=TASKS)
    for status in ("failed", "cancelled"):
        op.drop_index(f"ix_pending_analysis_{status}", table_name=TASKS)
    op.drop_index("ix_pending_analysis_finished", table_name=TASKS)
    op.create_index(
        "ix_pending_analysis_status",
        TASKS,
        ["status"],
        postgresql_where=NOT_PENDING,
        sqlite_where=NOT_PENDING,
    )
