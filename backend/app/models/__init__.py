"""The tables: rows only, no behaviour."""

from __future__ import annotations

from app.models.api_token import ApiToken
from app.models.async_task import (
    FINISHED_STATUSES,
    AnalysisNotification,
    NotificationType,
    PendingAnalysis,
    TaskStatus,
)
from app.models.base import Base
from app.models.processor import Processor, ProcessorState
from app.models.queue_state import QueueState, TaskStart
from app.models.schedule import ScheduleState

__all__ = [
    "FINISHED_STATUSES",
    "AnalysisNotification",
    "ApiToken",
    "Base",
    "NotificationType",
    "PendingAnalysis",
    "Processor",
    "ProcessorState",
    "QueueState",
    "ScheduleState",
    "TaskStart",
    "TaskStatus",
]
