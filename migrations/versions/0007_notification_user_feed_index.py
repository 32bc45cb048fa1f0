"""analysis_notifications (user_id, id): a user's feed page is a range of one index read in
order, not every notification of the user sorted

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

GET /notifications and the notification stream page a user's notifications by id (newest
first, or after ``after_id`` oldest first). The feed index ``(user_id, is_read, created_at
DESC)`` finds the user's rows but not in id order, so each poll read and sorted all of
them: ~0.1 s for a user with 200,000 notifications on SQLite. Partial over rows with a
user (a feed filtered by ``user_id = ?`` never reads the others), like migration 0005's.
On PostgreSQL the index is built in the migration's transaction, holding writes on the
table: about a second per million rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFICATIONS = "analysis_notifications"
INDEX = "ix_analysis_notifications_user_id"


def upgrade() -> None:
    present = sa.text("user_id IS NOT NULL")
    op.create_index(
        INDEX, NOTIFICATIONS, ["user_id", "id"], postgresql_where=present, sqlite_where=present
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name=NOTIFICATIONS)
