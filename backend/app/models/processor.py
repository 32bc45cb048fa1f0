"""One row per running daemon."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base
from app.models.types import UTCDateTime, utcnow


class ProcessorState(StrEnum):
    """A daemon's life: claiming, finishing its last jobs, or gone."""

    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Processor(Base):
    """A daemon as operators see it: where it runs, how busy it is, when it last spoke."""

    __tablename__ = "processors"
    __table_args__ = (
        CheckConstraint("state IN ('running', 'draining', 'stopped')", name="state_valid"),
    )

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(50))
    queues: Mapped[str] = mapped_column(String(1000), default="*")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    concurrency: Mapped[int] = mapped_column(Integer)
    in_flight: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=ProcessorState.RUNNING)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    #: boot id and PID namespace of the daemon's process (app.services.processor.host):
    #: a daemon with the same key can tell from the pid alone whether this one is gone.
    host_key: Mapped[str | None] = mapped_column(String(100), nullable=True)
