"""schedules: the last tick enqueued by each periodic schedule, shared by every daemon

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.models.types import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("cron", sa.String(255), nullable=False),
        sa.Column("last_tick", UTCDateTime(), nullable=False),
        sa.Column(
            "last_task_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("last_enqueued_at", UTCDateTime(), nullable=True),
        sa.Column("enqueued_total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("kind", name=op.f("pk_schedules")),
    )


def downgrade() -> None:
    op.drop_table("schedules")
