"""The state of periodic schedules, shared by every daemon."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base
from app.models.types import UTCDateTime, utcnow


class ScheduleState(Base):
    """One row per periodic schedule (by kind): the last tick enqueued for it. Daemons lock
    the row to enqueue a tick, so a tick is enqueued once whatever the number of daemons,
    and a daemon back from downtime knows which ticks it missed (the tasks themselves may
    have been pruned)."""

    __tablename__ = "schedules"

    kind: Mapped[str] = mapped_column(String(100), primary_key=True)
    cron: Mapped[str] = mapped_column(String(255))
    last_tick: Mapped[datetime] = mapped_column(UTCDateTime)
    last_task_id: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    last_enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    enqueued_total: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
