"""processors.host_key: the boot id and PID namespace of each daemon's process, so that a
daemon on the same machine can tell from the pid whether another is gone and give its
jobs back at once, instead of when their leases expire

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

Nullable, no default: rows of daemons started before this revision, and of daemons on
systems without /proc, have none and are only ever rescued by lease expiry.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("processors", sa.Column("host_key", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("processors") as batch:
        batch.drop_column("host_key")
