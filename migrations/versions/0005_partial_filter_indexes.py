"""partial filter indexes: the task list's (user_id | project_id | chapter_id, id) indexes
hold only the rows that have that column

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A claim and a completion each change ``status``, which the claim's partial indexes read, so
neither update is HOT: each adds an entry to every index of ``pending_analysis`` whose
predicate the new row version satisfies. The three filter columns are often NULL (a job
without a project, a chapter or a user), and a list filtered by one of them (``col = ?``)
never reads the NULL rows, so those entries were written only to be skipped. Both engines
prove ``col IS NOT NULL`` from ``col = ?`` and read the partial index for the same lists
(tests/integration/test_read_plans.py). On PostgreSQL the indexes are rebuilt in the
migration's transaction, holding writes on the table: about a second per index per million
rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASKS = "pending_analysis"
FILTERS = ("user_id", "project_id", "chapter_id")


def upgrade() -> None:
    for column in FILTERS:
        present = sa.text(f"{column} IS NOT NULL")
        op.drop_index(f"ix_pending_analysis_{column}", table_name=TASKS)
        op.create_index(
            f"ix_pending_analysis_{column}",
            TASKS,
            [column, "id"],
            postgresql_where=present,
            sqlite_where=present,
        )


def downgrade() -> None:
    for column in FILTERS:
        op.drop_index(f"ix_pending_analysis_{column}", table_name=TASKS)
        op.create_index(f"ix_pending_analysis_{column}", TASKS, [column, "id"])
