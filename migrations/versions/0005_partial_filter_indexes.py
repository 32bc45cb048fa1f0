"""partial indexes over nullable columns: the task list's (user_id | project_id |
chapter_id, id) indexes and the completed_at index hold only the rows that have a value

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

A claim and a completion each change ``status``, which the claim's partial indexes read, so
neither update is HOT: each adds an entry to every index of ``pending_analysis`` whose
predicate the new row version satisfies. The three filter columns are often NULL (a job
without a project, a chapter or a user), and a list filtered by one of them (``col = ?``)
never reads the NULL rows, so those entries were written only to be skipped. Likewise
``completed_at`` is NULL until a task finishes and is only ever read as a range of times
(the last hour, pruning): an enqueue and a claim wrote a NULL entry there. Both engines
prove ``col IS NOT NULL`` from ``col = ?`` or ``col >= ?`` and read the partial index for
the same queries (tests/integration/test_read_plans.py). On PostgreSQL the four indexes are
rebuilt in the migration's transaction, holding writes on the table: about a second per
index per million rows.
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
COMPLETED_AT = "ix_pending_analysis_completed_at"


def upgrade() -> None:
    finished = sa.text("completed_at IS NOT NULL")
    op.drop_index(COMPLETED_AT, table_name=TASKS)
    op.create_index(
        COMPLETED_AT, TASKS, ["completed_at"], postgresql_where=finished, sqlite_where=finished
    )
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
    op.drop_index(COMPLETED_AT, table_name=TASKS)
    op.create_index(COMPLETED_AT, TASKS, ["completed_at"])
