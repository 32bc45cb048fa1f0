"""State shared by every daemon for flow control: queue pause switches, rate-limit starts."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, Index, Integer, String, false
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base
from app.models.types import UTCDateTime, utcnow


class QueueState(Base):
    """One row per queue an operator has paused (or paused and resumed). A queue with no row
    runs; daemons claim nothing from a paused queue, and running jobs finish."""

    __tablename__ = "queue_states"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(255))


class TaskStart(Base):
    """One row per start of a rate-limited kind, kept for the limit's window: daemons count
    them to start at most N tasks of the kind per period, together."""

    __tablename__ = "task_starts"
    __table_args__ = (Index("ix_task_starts_kind_started_at", "kind", "started_at"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
