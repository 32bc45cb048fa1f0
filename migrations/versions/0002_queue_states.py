"""flow control: queue_states (pause and resume a queue for every daemon) and task_starts
(the starts of rate-limited kinds within their window)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.models.types import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "queue_states",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_queue_states")),
    )
    op.create_table(
        "task_starts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_starts")),
    )
    op.create_index("ix_task_starts_kind_started_at", "task_starts", ["kind", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_task_starts_kind_started_at", table_name="task_starts")
    op.drop_table("task_starts")
    op.drop_table("queue_states")
